"""One function per control command: ``cmd_<command>(ns) -> exit code``.

The parser (parser.py) binds each to its sub-command with ``set_defaults(func=...)``.
A command calls the agent through ``Control`` (which turns failures into
``CliError``), prints through output.py, and returns its exit code (exits.py).
"""
from __future__ import annotations

import json
import sys
import time

from agent.cli.client import Control
from agent.cli.cluster import Cluster
from agent.cli.exits import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError
from agent.cli.output import (FINAL_STATES, emit, fmt_bytes, format_drain, format_progress, format_report,
                              format_vm, key_values, note, table, vm_rows)
from agent.cli.units import human

WAIT_FOREVER = None      # a --wait call lasts as long as the migration
SHORT_CALL_S = 30.0


def _control(ns) -> Control:
    return Control(cluster(ns).agent(ns.agent))


def cluster(ns) -> Cluster:
    """The hosts file (cluster.py), loaded once per command."""
    if getattr(ns, "_cluster", None) is None:
        ns._cluster = Cluster.load()
    return ns._cluster


def _wait_timeout(ns) -> float | None:
    return WAIT_FOREVER if getattr(ns, "wait", False) else SHORT_CALL_S


def migration_exit(r: dict, what: str = "migration") -> int:
    """0 only for a job (migration, storage move) that completed and was
    verified; says why otherwise when the report does not."""
    if r.get("status") == "completed":
        if r.get("verified") is True:
            return EXIT_OK
        note(f"{what} {r.get('id')} of {r.get('vm')} completed but was not verified")
    return EXIT_FAIL


def drain_exit(r: dict) -> int:
    """0 only when the drain completed and every VM it moved was verified."""
    unverified = [v["vm"] for v in r.get("vms", []) if v.get("status") == "completed" and v.get("verified") is not True]
    if unverified:
        note(f"drain: completed but not verified: {', '.join(unverified)}")
    if r.get("status") == "completed" and not unverified:
        return EXIT_OK
    return EXIT_FAIL


# ---- VMs ------------------------------------------------------------------
def cmd_vm_create(ns) -> int:
    extra = {}
    if ns.disk:
        extra["disks"] = ns.disk
    if ns.attach:
        extra["attach"] = ns.attach
    r = _control(ns).call("vm.create", timeout_s=300.0, name=ns.name, memory=ns.memory, workload=ns.workload,
                          prefill=ns.prefill, cpu=ns.cpu, networks=ns.network, **extra)
    disks = "".join(f", disk {d['name']} {fmt_bytes(d['size_bytes'])}" for d in r.get("disks", []))
    emit(ns, r, f"created {r['name']} ({fmt_bytes(r['memory_bytes'])}{disks}, {r['workload']}): {r['state']}")
    return EXIT_OK


def cmd_vm_list(ns) -> int:
    cols = ["name", "state", "memory_bytes", "workload", "writes", "write_rate_pps", "disks", "disk_bytes",
            "io_writes"]
    if getattr(ns, "all", False):
        from agent.cli.clusterview import each_host

        return each_host(ns, cluster(ns), "vm.list", lambda rows: table(vm_rows(rows), ["host", *cols]))
    r = _control(ns).call("vm.list")
    emit(ns, r, table(vm_rows(r), cols))
    return EXIT_OK


def cmd_vm_show(ns) -> int:
    from agent.cli.clusterview import last_migration_line

    r = _control(ns).call("vm.show", name=ns.name)
    emit(ns, r, format_vm({**r, "last_migration": last_migration_line(r.get("last_migration"))}))
    return EXIT_OK


def cmd_vm_delete(ns) -> int:
    r = _control(ns).call("vm.delete", name=ns.name, keep_files=ns.keep_files)
    removed = r.get("files_removed") or []
    kept = r.get("files_kept") or []
    emit(ns, r, f"deleted {r['deleted']}" + (f"; removed {', '.join(removed)}" if removed else "")
         + (f"; kept {', '.join(kept)}" if kept else ""))
    return EXIT_OK


def _vm_state(ns, op: str, **args) -> int:
    r = _control(ns).call(op, name=ns.name, **args)
    state = r.get("state") if isinstance(r, dict) else None
    emit(ns, r, f"{ns.name}: {state}" if state is not None else f"{ns.name}: {json.dumps(r)}")
    return EXIT_OK


def cmd_vm_pause(ns) -> int:
    return _vm_state(ns, "vm.pause")


def cmd_vm_resume(ns) -> int:
    return _vm_state(ns, "vm.resume", force=ns.force)


def cmd_vm_start(ns) -> int:
    return _vm_state(ns, "vm.start")


# ---- migrations -----------------------------------------------------------
def migration_args(ns, **args) -> dict:
    """Options shared by migrate and drain, as control-API arguments."""
    args["wait"] = ns.wait
    if ns.downtime_ms is not None:
        args["downtime_ms"] = ns.downtime_ms
    if ns.max_bandwidth is not None:
        args["max_bandwidth_mibps"] = ns.max_bandwidth
    if getattr(ns, "streams", None) is not None:
        args["streams"] = ns.streams
    return args


def migrate_args(ns) -> dict:
    """The "migrate" request: ``verify`` is always sent, None meaning the agent's migration.verify."""
    storage = {k: v for k, v in (("storage", ns.storage), ("storage_dest", ns.storage_dest), ("map", ns.map))
               if v}                                   # absent: the agent's default (auto)
    if getattr(ns, "allow_network_change", False):
        storage["allow_network_change"] = True
    return migration_args(ns, vm=ns.vm, to=ns.to, priority=ns.priority, verify=ns.verify, **storage)


def _resolve_to(ns) -> None:
    """``--to``: a host name of the hosts file, HOST (default port) or HOST:PORT."""
    c = cluster(ns)
    ns.to = [c.target(t) for t in ns.to] if isinstance(ns.to, list) else c.target(ns.to)


def cmd_migrate(ns) -> int:
    _resolve_to(ns)
    cl = _control(ns)
    if ns.dry_run:
        return dry_run(ns, cl)
    if not ns.wait:
        # The destination's admission first: a refusal is an error now, not a failed job later.
        r = cl.call("migrate", timeout_s=SHORT_CALL_S, check=True, **migrate_args(ns))
        emit(ns, r, r["id"])
        return EXIT_OK
    from agent.cli.progress import wait_jobs

    job = cl.call("migrate", timeout_s=SHORT_CALL_S, **{**migrate_args(ns), "wait": False})
    r = wait_jobs(lambda: cl.call("job.wait", timeout_s=WAIT_FOREVER, id=job["id"]),
                  lambda: [j for j in cl.call("jobs", running=True) if j["id"] == job["id"]],
                  lambda j: cl.call("cancel", timeout_s=WAIT_FOREVER, id=j["id"]))
    emit(ns, r, format_report(r))
    if r.get("state") == "cancelled":
        note(f"migration {r['id']} cancelled: {r['vm']} runs here")
    return migration_exit(r)


def dry_run(ns, cl: Control) -> int:
    """``migrate --dry-run``: this VM checked here, then the destination's admission; nothing is created."""
    r = cl.call("migrate.check", vm=ns.vm, to=ns.to, verify=ns.verify)
    r["reject_code"] = r.pop("code", None)           # the destination's (protocol) code, not an exit code
    who = f"{r['destination']}" + (f" (agent {r['agent']})" if r.get("agent") else "")
    if r["ok"]:
        emit(ns, r, f"{who} would accept {r['vm']} ({fmt_bytes(r['memory_bytes'])}); answered in {r['ms']:.0f} ms")
        return EXIT_OK
    message = r.get("message") or f"{who} refuses {r['vm']}: {r['reason']}"
    if ns.json:                                      # the error form, with the destination's answer beside it
        emit(ns, {"error": message, "code": EXIT_FAIL, **r}, "")
        return EXIT_FAIL
    raise CliError(message)


def cmd_drain(ns) -> int:
    _resolve_to(ns)
    cl = _control(ns)
    if not ns.wait:
        r = cl.call("drain", timeout_s=SHORT_CALL_S, **migration_args(ns, to=ns.to))
        emit(ns, r, "maintenance on; queued " + (" ".join(j["id"] for j in r["jobs"]) or "nothing"))
        return EXIT_OK
    from agent.cli.progress import wait_jobs

    before = {j["id"] for j in cl.call("jobs", running=True)}
    r = wait_jobs(lambda: cl.call("drain", timeout_s=WAIT_FOREVER, **migration_args(ns, to=ns.to)),
                  lambda: [j for j in cl.call("jobs", running=True)
                           if j["id"] not in before and j.get("direction") == "outbound"],
                  lambda j: cl.call("cancel", timeout_s=WAIT_FOREVER, id=j["id"]))
    emit(ns, r, format_drain(r))
    return drain_exit(r)


def cmd_undrain(ns) -> int:
    r = _control(ns).call("undrain")
    emit(ns, r, "maintenance off")
    return EXIT_OK


def watch_jobs(cl: Control, interval_s: float) -> int:
    """Live progress bars until every job has ended."""
    tty = sys.stdout.isatty()
    t0 = time.time()
    while True:
        jobs = cl.call("jobs", since=t0)          # those under way, and those that ended while watched
        lines = [format_progress(j) for j in jobs] or ["(no jobs)"]
        if tty:
            sys.stdout.write("\x1b[H\x1b[2J")
        print("\n".join(lines), flush=True)
        if all(j["state"] in FINAL_STATES for j in jobs):
            return EXIT_OK
        if not tty:
            print("--", flush=True)
        time.sleep(interval_s)   # a display refresh period, not a wait for a condition


JOB_COLUMNS = ["id", "kind", "vm", "direction", "source", "destination", "state", "progress_pct",
               "finished_at", "downtime_ms", "verified", "error"]


def jobs_filters(ns) -> dict:
    f = {}
    if ns.vm:
        f["vm"] = ns.vm
    if ns.state:
        f["state"] = ns.state
    if ns.since is not None:
        f["since"] = ns.since
    return f


def cmd_jobs(ns) -> int:
    if ns.all:
        from agent.cli.clusterview import each_host

        return each_host(ns, cluster(ns), "jobs", lambda rows: table(rows, ["host", *JOB_COLUMNS]),
                         **jobs_filters(ns))
    cl = _control(ns)
    if ns.watch:
        return watch_jobs(cl, ns.interval)
    r = cl.call("jobs", **jobs_filters(ns))
    emit(ns, r, table(r, JOB_COLUMNS))
    return EXIT_OK


def cmd_job(ns) -> int:
    if ns.id == "set":
        return job_set(ns)
    if ns.target is not None:
        raise CliError(f"job: unexpected {ns.target!r} after the job id (to tune a job: livemig job set ID ...)",
                       EXIT_USAGE)
    if ns.max_bandwidth is not None or ns.downtime_ms is not None:
        raise CliError("job: --max-bandwidth and --downtime-ms go with 'livemig job set ID'", EXIT_USAGE)
    r = _control(ns).call("job.wait" if ns.wait else "job.show", timeout_s=_wait_timeout(ns), id=ns.id)
    emit(ns, r, format_report(r))
    return migration_exit(r) if ns.wait else EXIT_OK


def job_set(ns) -> int:
    """``job set ID --max-bandwidth MIBPS --downtime-ms MS``: tune a running outbound migration."""
    if ns.target is None:
        raise CliError("job set: which job? (livemig job set ID --max-bandwidth MIBPS --downtime-ms MS)", EXIT_USAGE)
    if ns.max_bandwidth is None and ns.downtime_ms is None:
        raise CliError("job set: nothing to set: give --max-bandwidth MIBPS and/or --downtime-ms MS", EXIT_USAGE)
    if ns.wait:
        raise CliError("job set: --wait goes with 'livemig job ID --wait'", EXIT_USAGE)
    args = {"id": ns.target}
    if ns.max_bandwidth is not None:
        args["max_bandwidth_mibps"] = ns.max_bandwidth
    if ns.downtime_ms is not None:
        args["downtime_ms"] = ns.downtime_ms
    r = _control(ns).call("job.set", **args)
    bw = "unlimited" if not r["max_bandwidth_mibps"] else f"{r['max_bandwidth_mibps']} MiB/s"
    emit(ns, r, f"{r['id']} ({r['vm']}, {r['state']}): bandwidth {bw}, downtime target {r['downtime_ms']} ms")
    return EXIT_OK


def cmd_report(ns) -> int:
    r = _control(ns).call("job.show", id=ns.id)
    if ns.svg:
        from agent.observe.svgreport import write_svg

        write_svg(r, ns.svg)
        emit(ns, {"svg": ns.svg, "id": r["id"]}, f"wrote {ns.svg}")
    else:
        emit(ns, r, format_report(r))
    return EXIT_OK


def cmd_cancel(ns) -> int:
    r = _control(ns).call("cancel", timeout_s=WAIT_FOREVER, id=ns.id)
    state = r.get("state", r["status"])
    emit(ns, r, f"{r['id']} ({r['vm']}): {state}" + (f"; {r['vm']} runs here" if state == "cancelled" else ""))
    return EXIT_OK if r["status"] == "cancelled" else EXIT_FAIL


# ---- the agent as a whole -------------------------------------------------
def cmd_status(ns) -> int:
    r = _control(ns).call("status")
    emit(ns, r, key_values(r, 24))
    return EXIT_OK


def cmd_config_set(ns) -> int:
    r = _control(ns).call("config.set", key=ns.key, value=ns.value)
    emit(ns, r, "\n".join(f"{k.replace('_', '-')} = {v}" for k, v in r.items()))
    return EXIT_OK


def cmd_config_get(ns) -> int:
    args = {"key": ns.key} if ns.key else {}
    r = _control(ns).call("config.get", **args)
    if ns.key:
        v = r["value"]                      # as it would be written in the config file
        emit(ns, r, f"{r['key']} = {v if isinstance(v, str) else json.dumps(v)}")
        return EXIT_OK
    lines = ["run-time settings (livemig config set KEY VALUE):"]
    lines += [f"  {k:24} {v['value']:<6} {v['help']}" for k, v in r["settings"].items()]
    lines.append("configuration (file and flags; livemig agent --set SECTION.KEY=VALUE):")
    for section, keys in r["config"].items():
        lines += [f"  {section + '.' + k:38} {human('', v) if not isinstance(v, str) else v or '-'}"
                  for k, v in keys.items()]
    emit(ns, r, "\n".join(lines))
    return EXIT_OK


def cmd_demo(ns) -> int:
    from agent.cli.demo import run_demo

    return run_demo()


def cmd_bench(ns) -> int:
    import subprocess
    import sys

    # The benchmark is its own program (nothing imports agent.bench); it parses its own options.
    return subprocess.call([sys.executable, "-m", "agent.bench", *ns.extra, *ns.args])
