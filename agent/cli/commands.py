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
from agent.cli.exits import EXIT_FAIL, EXIT_OK
from agent.cli.output import (FINAL_STATES, emit, fmt_bytes, format_drain, format_progress, format_report,
                              format_vm, key_values, note, table, vm_rows)

WAIT_FOREVER = None      # a --wait call lasts as long as the migration
SHORT_CALL_S = 30.0


def _control(ns) -> Control:
    return Control(ns.agent)


def _wait_timeout(ns) -> float | None:
    return WAIT_FOREVER if getattr(ns, "wait", False) else SHORT_CALL_S


def migration_exit(r: dict) -> int:
    """0 only for a migration that completed and was verified; says why otherwise when the report does not."""
    if r.get("status") == "completed":
        if r.get("verified") is True:
            return EXIT_OK
        note(f"migration {r.get('id')} of {r.get('vm')} completed but was not verified")
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
                          prefill=ns.prefill, **extra)
    disks = "".join(f", disk {d['name']} {fmt_bytes(d['size_bytes'])}" for d in r.get("disks", []))
    emit(ns, r, f"created {r['name']} ({fmt_bytes(r['memory_bytes'])}{disks}, {r['workload']}): {r['state']}")
    return EXIT_OK


def cmd_vm_list(ns) -> int:
    r = _control(ns).call("vm.list")
    emit(ns, r, table(vm_rows(r), ["name", "state", "memory_bytes", "workload", "writes", "write_rate_pps",
                                   "disks", "disk_bytes", "io_writes"]))
    return EXIT_OK


def cmd_vm_show(ns) -> int:
    r = _control(ns).call("vm.show", name=ns.name)
    emit(ns, r, format_vm(r))
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
    return args


def migrate_args(ns) -> dict:
    """The "migrate" request: ``verify`` is always sent, None meaning the agent's migration.verify."""
    return migration_args(ns, vm=ns.vm, to=ns.to, priority=ns.priority, verify=ns.verify)


def cmd_migrate(ns) -> int:
    r = _control(ns).call("migrate", timeout_s=_wait_timeout(ns), **migrate_args(ns))
    if not ns.wait:
        emit(ns, r, r["id"])
        return EXIT_OK
    emit(ns, r, format_report(r))
    return migration_exit(r)


def cmd_drain(ns) -> int:
    r = _control(ns).call("drain", timeout_s=_wait_timeout(ns), **migration_args(ns, to=ns.to))
    if not ns.wait:
        emit(ns, r, "maintenance on; queued " + " ".join(j["id"] for j in r["jobs"]))
        return EXIT_OK
    emit(ns, r, format_drain(r))
    return drain_exit(r)


def cmd_undrain(ns) -> int:
    r = _control(ns).call("undrain")
    emit(ns, r, "maintenance off")
    return EXIT_OK


def watch_jobs(cl: Control, interval_s: float) -> int:
    """Live progress bars until every job has ended."""
    tty = sys.stdout.isatty()
    while True:
        jobs = cl.call("jobs")
        lines = [format_progress(j) for j in jobs] or ["(no jobs)"]
        if tty:
            sys.stdout.write("\x1b[H\x1b[2J")
        print("\n".join(lines), flush=True)
        if all(j["state"] in FINAL_STATES for j in jobs):
            return EXIT_OK
        if not tty:
            print("--", flush=True)
        time.sleep(interval_s)   # a display refresh period, not a wait for a condition


def cmd_jobs(ns) -> int:
    cl = _control(ns)
    if ns.watch:
        return watch_jobs(cl, ns.interval)
    r = cl.call("jobs")
    emit(ns, r, table(r, ["id", "kind", "vm", "direction", "source", "destination", "state", "pages_sent", "error"]))
    return EXIT_OK


def cmd_job(ns) -> int:
    r = _control(ns).call("job.wait" if ns.wait else "job.show", timeout_s=_wait_timeout(ns), id=ns.id)
    emit(ns, r, format_report(r))
    return migration_exit(r) if ns.wait else EXIT_OK


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
    emit(ns, r, f"{r['id']}: {r['status']}")
    return EXIT_OK if r["status"] == "cancelled" else EXIT_FAIL


# ---- the agent as a whole -------------------------------------------------
def cmd_status(ns) -> int:
    r = _control(ns).call("status")
    emit(ns, r, key_values(r, 24))
    return EXIT_OK


def cmd_config_set(ns) -> int:
    r = _control(ns).call("config.set", key=ns.key, value=ns.value)
    emit(ns, r, json.dumps(r))
    return EXIT_OK


def cmd_demo(ns) -> int:
    from agent.cli.demo import run_demo

    return run_demo()


def cmd_bench(ns) -> int:
    import subprocess
    import sys

    # The benchmark is its own program (nothing imports agent.bench); it parses its own options.
    return subprocess.call([sys.executable, "-m", "agent.bench", *ns.extra, *ns.args])
