"""Views across hosts (``vm list --all``, ``jobs --all``, ``hosts``) and the last-migration line of ``vm show``."""
from __future__ import annotations

from typing import Callable

from agent.cli.client import Control
from agent.cli.cluster import Cluster
from agent.cli.exits import EXIT_FAIL, EXIT_OK, CliError
from agent.cli.output import emit, note, table
from agent.cli.units import ago, fmt_ms, iso

ALL_CALL_S = 10.0


def each_host(ns, cluster: Cluster, op: str, render: Callable[[list[dict]], str], **args) -> int:
    """``op`` on every host of the hosts file, rows tagged with ``host``; a host that does not
    answer is named on stderr (and in ``errors`` with --json) and the exit code is 1."""
    rows: list[dict] = []
    errors: list[dict] = []
    for h in cluster.controls():
        try:
            rows += [{"host": h.name, **r} for r in Control(h.control, timeout_s=ALL_CALL_S).call(op, **args)]
        except CliError as exc:
            errors.append({"host": h.name, "error": exc.message, "code": exc.code})
            if not getattr(ns, "json", False):
                note(f"host {h.name}: {exc.message}")
    emit(ns, {"hosts": [h.name for h in cluster.controls()], "rows": rows, "errors": errors}
         if getattr(ns, "json", False) else rows, render(rows))
    return EXIT_FAIL if errors else EXIT_OK


def cmd_hosts(ns) -> int:
    """``livemig hosts``: the hosts file, and whether each agent answers."""
    cluster = Cluster.load()
    rows = []
    for h in cluster.hosts.values():
        row = {"host": h.name, "control": h.control, "address": h.address, "agent": None, "version": None,
               "vms": None, "error": None}
        if h.control:
            try:
                st = Control(h.control, timeout_s=ALL_CALL_S).call("status")
                row.update(agent=st.get("agent"), version=st.get("version"), vms=st.get("vms"))
            except CliError as exc:
                row["error"] = exc.message
        rows.append(row)
    human = table(rows, ["host", "control", "address", "agent", "version", "vms", "error"]) if rows else \
        f"no hosts in {cluster.path}"
    emit(ns, {"file": cluster.path, "default_port": cluster.default_port, "hosts": rows}, human)
    return EXIT_FAIL if any(r["error"] for r in rows) else EXIT_OK


def last_migration_line(m: dict | None) -> str | None:
    """``vm show``: "completed 2024-.. (5 min ago), A -> B, downtime 12.0 ms, verified yes"."""
    if not m:
        return None
    when = f"{iso(m['finished_at'])} ({ago(m['finished_at'])})" if m.get("finished_at") else "-"
    line = (f"{m.get('state')} {when}, {m.get('source') or '-'} -> {m.get('destination') or '-'}, "
            f"downtime {fmt_ms(m.get('downtime_ms') or 0)}, verified {'yes' if m.get('verified') else 'no'} "
            f"(job {m.get('id')})")
    return line + (f" [{m['error']}]" if m.get("error") else "")


HOSTS_HELP = """the hosts file: $LIVEMIG_HOSTS, else ~/.config/livemig/hosts.toml

    default_port = 7700                  # optional: the port of a bare --to HOST

    [hosts.host-a]
    control = "/run/livemig/a.sock"      # its control socket: --agent host-a, --all
    address = "10.0.0.1:7700"            # its migration address: --to host-a (the port may be left out)
"""


def register(sub, command) -> None:
    import argparse

    p = command(sub, "hosts", cmd_hosts, "the hosts of the hosts file and whether their agents answer")
    p.description = f"the hosts of the hosts file and whether their agents answer.\n\n{HOSTS_HELP}"
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--json", action="store_true", help="print the result as JSON")
