"""The ``livemig`` argument parser: every command, its options with their help, and the exit codes.

Each sub-command carries its handler (``set_defaults(func=...)``, commands.py /
agentcmd.py), so ``main`` only parses and calls ``ns.func(ns)``. Option values
are checked here (a bad value is a usage error, exit 2), and parse errors are
raised as ``UsageError`` instead of argparse's print-usage-and-exit, so main
reports them like every other error (one line, or JSON with --json).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
from typing import Callable

from agent.cli import agentcmd, commands as c
from agent.control.status_ops import SETTINGS
from agent.cli.exits import EXIT_CODES_HELP, UsageError

VERIFY_MODES = ("incremental", "full")


class LivemigParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised (``UsageError``), not printed with sys.exit(2)."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        command = self.prog.partition(" ")[2]          # "livemig vm create" -> "vm create"
        raise UsageError(f"{command + ': ' if command else ''}{message} (see '{self.prog} --help')")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n
    parse.__name__ = f"integer >= {low}"
    return parse


def number_in(cast: Callable[[str], float], low: float, high: float, what: str) -> Callable[[str], float]:
    """An argparse type: ``cast(text)`` within [low, high] (e.g. days, seconds)."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"{what}: {low:g}..{high:g}, got {v:g}")
        return v
    parse.__name__ = what
    return parse


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def disk_spec(text: str) -> dict:
    """``NAME:SIZE[:PATH]`` -> {"name", "size"[, "path"]} (the size is checked by the agent)."""
    name, _, rest = text.partition(":")
    size, _, path = rest.partition(":")
    if not name or not size:
        raise argparse.ArgumentTypeError(f"expected NAME:SIZE[:PATH], got {text!r}")
    out = {"name": name, "size": size}
    if path:
        out["path"] = os.path.abspath(path)
    return out


def attach_spec(text: str) -> dict:
    """``NAME:PATH`` -> {"name", "path"}."""
    name, _, path = text.partition(":")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME:PATH, got {text!r}")
    return {"name": name, "path": os.path.abspath(path)}


def package_version() -> str:
    try:
        return importlib.metadata.version("livemig")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (package not installed)"


def _command(sub, name: str, func, help_text: str, **kw) -> LivemigParser:
    p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXIT_CODES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    if func is not None:            # a group (vm, config) takes its handler from its sub-command
        p.set_defaults(func=func)
    return p


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help='print the result as JSON; an error as {"error": ..., "code": N} on stdout')


def _add_agent(sub) -> None:
    a = _command(sub, "agent", agentcmd.cmd_agent, "run an agent in the foreground until SIGTERM/SIGINT")
    a.add_argument("--name", help="agent name, used in segment names and reports (e.g. --name host-a)")
    a.add_argument("--listen", metavar="HOST:PORT", help="migration endpoint, port 0 = ephemeral (e.g. 0.0.0.0:7700)")
    a.add_argument("--control", metavar="PATH", help="control socket path (e.g. /run/livemig/agent.sock)")
    a.add_argument("--data-dir", metavar="DIR", help="VM records and guest logs (e.g. /var/lib/livemig)")
    a.add_argument("--config", metavar="FILE", help="TOML config file; flags and --set override it")
    a.add_argument("--max-live-migrations", type=int_at_least(1), metavar="N",
                   help="live migrations at once, inbound and outbound together (e.g. 4)")
    a.add_argument("--shm-prefix", metavar="PREFIX", help="prefix of this agent's /dev/shm segments")
    a.add_argument("--downtime-ms", type=int_at_least(1), metavar="MS", help="default downtime target (e.g. 300)")
    a.add_argument("--log-format", choices=("auto", "json", "console"), help="log format (auto: console on a TTY)")
    a.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="lowest level logged")
    a.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    a.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key, repeatable (e.g. --set limits.max_guest_memory_mib=4096)")


def _add_vm(sub) -> None:
    vm = _command(sub, "vm", None, "manage VMs").add_subparsers(dest="vmcmd", required=True, metavar="COMMAND")
    cr = _command(vm, "create", c.cmd_vm_create, "create a VM and start its guest")
    cr.add_argument("name", help="VM name: 1-64 of A-Z a-z 0-9 _ -")
    cr.add_argument("--memory", default="256M", help="guest RAM size (default 256M; e.g. 1G)")
    cr.add_argument("--workload", default="idle", help="guest workload (default idle; e.g. uniform:rate=5000)")
    cr.add_argument("--cpu", choices=("host", "compat"), default="host",
                    help="the CPU the VM needs: host (this host's vendor and flags, the default) or compat "
                         "(the vendor and the x86-64-v2 baseline: movable to older CPUs of that vendor)")
    cr.add_argument("--network", action="append", default=[], metavar="NAME",
                    help="a network the VM is connected to, repeatable (e.g. --network prod); a destination "
                         "must be connected to it too ([host] networks)")
    cr.add_argument("--prefill", choices=("none", "random"), default="none",
                    help="fill guest RAM before the guest starts (random = incompressible, no zero pages)")
    cr.add_argument("--disk", action="append", default=[], type=disk_spec, metavar="NAME:SIZE[:PATH]",
                    help="a new sparse disk image, repeatable (default path <data-dir>/disks/<vm>/NAME.img; "
                         "e.g. --disk root:1G --disk data:4G:/srv/img/data.img)")
    cr.add_argument("--attach", action="append", default=[], type=attach_spec, metavar="NAME:PATH",
                    help="an existing raw image as a disk, as it is (never deleted with the VM; "
                         "e.g. --attach data:/srv/img/data.img)")
    for name, func, help_text in (("list", c.cmd_vm_list, "list the VMs on this agent"),
                                  ("show", c.cmd_vm_show, "one VM's state and counters"),
                                  ("delete", c.cmd_vm_delete, "stop a VM's guest and remove it "
                                   "(and the disk images it created)"),
                                  ("pause", c.cmd_vm_pause, "pause a VM's guest (it keeps its memory)"),
                                  ("start", c.cmd_vm_start, "start a VM whose guest is not running (stopped, or broken)")):
        p = _command(vm, name, func, help_text)
        if name != "list":
            p.add_argument("name", help="VM name")
        else:
            _all(p, "the VMs of every host in the hosts file, with a HOST column")
        if name == "delete":
            p.add_argument("--keep-files", action="store_true",
                           help="keep the VM's disk images (attached ones are always kept)")
        _json(p)
    rs = _command(vm, "resume", c.cmd_vm_resume, "resume a paused VM")
    rs.add_argument("name", help="VM name")
    rs.add_argument("--force", action="store_true",
                    help="resume even a VM paused by a migration whose outcome is unknown: if the destination "
                         "runs it too, two copies of the VM run at once")
    for p in (cr, rs):
        _json(p)


def _all(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--all", action="store_true",
                   help=f"{help_text} ($LIVEMIG_HOSTS or ~/.config/livemig/hosts.toml; see 'livemig hosts --help')")


def since(text: str) -> float:
    """``--since``: 30s, 15m, 1h, 2d or an ISO 8601 time -> Unix time."""
    from agent.cli.units import parse_since

    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_migration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true",
                   help="wait for the end (live progress on a terminal; Ctrl-C cancels, twice detaches), "
                        "print the report; exit 0 only if verified")
    p.add_argument("--downtime-ms", type=int_at_least(1), metavar="MS",
                   help="downtime target for this migration, >= 1 (e.g. 50)")
    p.add_argument("--max-bandwidth", type=int_at_least(0), metavar="MIBPS",
                   help="bandwidth cap in MiB/s, 0 = unlimited (e.g. 500)")
    p.add_argument("--streams", type=int_at_least(1), metavar="N",
                   help="parallel data connections for this migration, 1..8 (the destination may grant "
                        "fewer); default: the agent's migration.streams")
    _json(p)


def _add_migrate(sub) -> None:
    m = _command(sub, "migrate", c.cmd_migrate, "live-migrate a VM to another agent")
    m.add_argument("vm", help="VM name")
    m.add_argument("--to", required=True, metavar="HOST[:PORT]",
                   help="destination agent: HOST:PORT, HOST (port 7700 or the hosts file's default_port) or a "
                        "host name from the hosts file (e.g. 10.0.0.2:7700, host-b)")
    m.add_argument("--dry-run", action="store_true",
                   help="only ask the destination whether it would take the VM now (memory, slots, name, "
                        "maintenance); creates nothing. Without --wait, migrate runs this check first anyway")
    m.add_argument("--priority", type=integer, default=0, help="higher leaves the queue first (default 0; e.g. 10)")
    m.add_argument("--allow-network-change", action="store_true",
                   help="move the VM even to a destination not connected to all of its networks")
    m.add_argument("--verify", choices=VERIFY_MODES, default=None,
                   help="how memory is proven equal: incremental (hashed while pages arrive) or full "
                        "(all of it hashed again); default: the agent's migration.verify")
    m.add_argument("--storage", choices=("auto", "shared", "copy"), default=None,
                   help="the VM's disks: shared (the destination sees the same files; only memory moves), "
                        "copy (mirrored to the destination while the VM runs), auto (shared if the destination "
                        "proves it sees the files, else copy; default)")
    m.add_argument("--storage-dest", metavar="DIR",
                   help="with copy: the directory on the destination for the copies "
                        "(default <its data-dir>/disks/<vm>; e.g. /srv/vms)")
    m.add_argument("--map", action="append", metavar="NAME=PATH",
                   help="with copy: where disk NAME goes on the destination, repeatable (e.g. --map d0=/srv/d0.img)")
    _add_migration_options(m)
    dr = _command(sub, "drain", c.cmd_drain, "maintenance: accept no VMs and move every VM to the targets")
    dr.add_argument("--to", action="append", required=True, metavar="HOST[:PORT]",
                    help="a target agent, repeatable, as for migrate --to (e.g. --to 10.0.0.2:7700 --to host-c)")
    _add_migration_options(dr)
    _json(_command(sub, "undrain", c.cmd_undrain, "end maintenance: accept inbound VMs again"))


def _add_jobs(sub) -> None:
    j = _command(sub, "jobs", c.cmd_jobs, "migrations of this agent: running, and finished ones "
                 "(the last 200 are kept across restarts)")
    _json(j)
    j.add_argument("--vm", metavar="NAME", help="only this VM's migrations")
    j.add_argument("--state", metavar="STATE",
                   help="only jobs in this state (e.g. failed, completed, cancelled, precopy, queued)")
    j.add_argument("--since", type=since, metavar="WHEN",
                   help="only jobs running or ended since WHEN: 30s, 15m, 1h, 2d or an ISO 8601 time")
    _all(j, "the jobs of every host in the hosts file, with a HOST column")
    j.add_argument("--watch", action="store_true", help="live progress until every job has ended (Ctrl-C stops)")
    j.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    r = _command(sub, "job", c.cmd_job, "one migration's report (job ID), or tune a running one (job set ID ...)",
                 usage="%(prog)s [-h] [--wait] [--json] ID\n       %(prog)s set ID [--max-bandwidth MIBPS] "
                       "[--downtime-ms MS] [--json]")
    r.add_argument("id", metavar="ID", help="job id (from 'livemig jobs'), or 'set' to tune the job that follows")
    r.add_argument("target", nargs="?", metavar="ID", help="with 'set': the job to tune (a running outbound migration)")
    r.add_argument("--wait", action="store_true", help="wait for the end; exit 0 only if completed and verified")
    r.add_argument("--max-bandwidth", type=int_at_least(0), metavar="MIBPS",
                   help="with 'set': the new bandwidth cap in MiB/s, 0 = unlimited (e.g. 200)")
    r.add_argument("--downtime-ms", type=int_at_least(1), metavar="MS",
                   help="with 'set': the new downtime target in ms (e.g. 100)")
    _json(r)
    rp = _command(sub, "report", c.cmd_report, "one migration's report, or a picture of it (--svg)")
    rp.add_argument("id", help="job id (from 'livemig jobs')")
    rp.add_argument("--svg", metavar="FILE", help="write an SVG: rounds, dirty pages, bandwidth, the pause")
    _json(rp)
    k = _command(sub, "cancel", c.cmd_cancel, "cancel a migration before commit (the VM stays here)")
    k.add_argument("id", metavar="ID|VM", help="job id (from 'livemig jobs'), or the name of a VM migrating away")
    _json(k)


def _add_misc(sub) -> None:
    _json(_command(sub, "status", c.cmd_status, "agent status: version, limits, slots, memory, maintenance"))
    cf = _command(sub, "config", None, "show the agent's configuration, change a setting at run time")
    cfs = cf.add_subparsers(dest="cfgcmd", required=True, metavar="COMMAND")
    settings = "\n".join(f"  {k:24} {v}" for k, v in SETTINGS.items())
    cs = _command(cfs, "set", c.cmd_config_set, f"set a run-time setting (not kept across restarts).\n\n"
                  f"settings:\n{settings}")
    cs.add_argument("key", metavar="KEY", help=f"one of: {', '.join(SETTINGS)}")
    cs.add_argument("value", help="the new value (e.g. 4)")
    _json(cs)
    cg = _command(cfs, "get", c.cmd_config_get, "the run-time settings and the configuration the agent runs "
                  f"with (SECTION.KEY), or one key.\n\nrun-time settings:\n{settings}")
    cg.add_argument("key", nargs="?", metavar="KEY",
                    help="a setting (e.g. max-live-migrations) or SECTION.KEY (e.g. migration.downtime_target_ms)")
    _json(cg)
    # --help and every other option go to the benchmark (python -m agent.bench), which has its own parser.
    bn = _command(sub, "bench", c.cmd_bench, "the benchmark: real agents, side by side with raw TCP "
                  "('livemig bench --help' for its options)", add_help=False)
    bn.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's options (--quick, --json, --out DIR, "
                    "--only A,B, --runs N; see livemig bench --help)")
    _command(sub, "demo", c.cmd_demo, "two agents, one VM, one live migration")


#: Command groups that live in their own modules: each has ``register(sub, command)``
#: (``command`` is ``_command`` above: name, function, help -> parser).
COMMAND_MODULES = ("agent.cli.storage", "agent.cli.security", "agent.cli.top", "agent.cli.clusterview",
                   "agent.cli.completion")


def _add_modules(sub) -> None:
    import importlib

    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue                      # being written this wave (see the closing note)
        mod.register(sub, _command)


def build_parser() -> LivemigParser:
    p = LivemigParser(prog="livemig", description="Live migration of shared-memory VMs between agents.",
                      epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"livemig {package_version()}",
                   help="print the livemig version and exit")
    p.add_argument("--agent", default=os.environ.get("LIVEMIG_AGENT"), metavar="SOCKET",
                   help="control socket of the agent to talk to (default: $LIVEMIG_AGENT)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for add in (_add_agent, _add_vm, _add_migrate, _add_jobs, _add_misc, _add_modules):
        add(sub)
    return p
