"""``livemig storage move``: move a VM's disk images to other files, live.

    livemig storage move VM --dest DIR [--wait] [--json]          all its disks into one folder
    livemig storage move VM --only NAME[,NAME] --dest DIR          only some of them
    livemig storage move VM --map NAME=PATH [--map NAME=PATH ...]  each to a chosen place

Registered by agent/cli/parser.py (``register(sub, command)``). Exit 0 with
``--wait`` only if the move completed and was verified.
"""
from __future__ import annotations

import argparse
import os

from agent.cli.client import Control
from agent.cli.exits import EXIT_OK
from agent.cli.output import bar, emit, fmt_bytes


def _map_item(text: str) -> str:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return f"{name}={os.path.abspath(path)}"


def _int_at_least_0(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def format_storage_report(r: dict) -> str:
    """A storage move's report (``kind: "storage"``), for ``storage move --wait`` and ``job ID``."""
    ww = r.get("guest_write_wait_mirroring") or {}
    lines = [
        f"storage move {r['id']}: {r['vm']} -> {r['destination']}",
        f"  status        {r['status']}" + (f"  ({r['error']})" if r.get("error") else ""),
        f"  verified      {'yes' if r.get('verified') else 'no'}"
        + (f"  ({r['verify_mismatches']} blocks read back wrong, recopied)" if r.get("verify_mismatches") else ""),
        f"  total         {r['total_ms']:.1f} ms",
        f"  io pause      {r.get('io_pause_ms', 0):.2f} ms at the switch",
        f"  copied        {fmt_bytes(r.get('bytes_copied', 0))} in {r.get('rounds', 0)} passes, "
        f"{r.get('held_windows', 0)} held windows (longest {r.get('held_ms_max', 0):.1f} ms)",
        f"  write wait    p99 {ww.get('p99_ms')} ms, max {ww.get('max_ms')} ms while copying"
        f" ({ww.get('samples', 0)} samples)",
        "  phases (ms)   " + ", ".join(f"{k} {v:.1f}" for k, v in r.get("phases", {}).items()),
    ]
    for d in r.get("disks", []):
        lines.append(f"    {d['name']:<10} {d['method']:<6} {d['from']} -> {d['to']}: copied "
                     f"{fmt_bytes(d['bytes_copied'])}, allocated {fmt_bytes(d['allocated_before'])} -> "
                     f"{fmt_bytes(d['allocated_after'])}")
    lines += [f"  warning: {w}" for w in r.get("warnings", [])]
    return "\n".join(lines)


def format_storage_progress(j: dict) -> str:
    """One ``jobs --watch`` line of a storage job."""
    frac = (j.get("progress_pct") or 0.0) / 100.0
    why = f" ({j['error']})" if j.get("error") else ""
    return (f"{j['id']} {j['vm']:<12} => {j['destination']:<21} {j['state']:<13} {bar(frac)} {frac * 100:5.1f}%  "
            f"{fmt_bytes(j.get('bytes_copied', 0))} copied, {fmt_bytes(j.get('bytes_remaining', 0))} left, "
            f"pass {j.get('rounds', 0)}{why}")


def storage_exit(r: dict) -> int:
    from agent.cli.commands import migration_exit

    return migration_exit(r, "storage move")


def cmd_storage_move(ns) -> int:
    args: dict = {"vm": ns.vm, "wait": ns.wait, "overwrite": ns.overwrite, "priority": ns.priority}
    if ns.dest is not None:
        args["dest"] = os.path.abspath(ns.dest)
    if ns.only:
        args["only"] = [n for part in ns.only for n in part.split(",") if n]
    if ns.map:
        args["map"] = ns.map
    if ns.max_bandwidth is not None:
        args["max_bandwidth_mibps"] = ns.max_bandwidth
    cl = Control(ns.agent)
    r = cl.call("storage.move", timeout_s=30.0, **{**args, "wait": False})
    if not ns.wait:
        emit(ns, r, r["id"])
        return EXIT_OK
    from agent.cli.progress import wait_jobs

    # a live progress line on a terminal; Ctrl-C cancels the move (twice: detaches)
    job = r
    r = wait_jobs(lambda: cl.call("job.wait", timeout_s=None, id=job["id"]),
                  lambda: [j for j in cl.call("jobs", running=True) if j["id"] == job["id"]],
                  lambda j: cl.call("cancel", timeout_s=None, id=j["id"]))
    emit(ns, r, format_storage_report(r))
    return storage_exit(r)


def register(sub, command) -> None:
    st = command(sub, "storage", None, "move a VM's disk images while it runs")
    ss = st.add_subparsers(dest="storagecmd", required=True, metavar="COMMAND")
    mv = command(ss, "move", cmd_storage_move,
                 "move a VM's disks to other files (another folder, filesystem or share), live: "
                 "copied and mirrored while the guest writes, verified, then switched; the old files "
                 "are deleted only after the switch")
    mv.add_argument("vm", help="VM name")
    mv.add_argument("--dest", metavar="DIR", help="existing directory for the disks (same file names)")
    mv.add_argument("--only", action="append", metavar="NAME[,NAME]",
                    help="with --dest: only these disks (e.g. --only data,logs)")
    mv.add_argument("--map", action="append", type=_map_item, metavar="NAME=PATH",
                    help="move disk NAME to PATH (a file, or a directory to keep its name), repeatable")
    mv.add_argument("--overwrite", action="store_true", help="replace target files that exist (never a VM's disk)")
    mv.add_argument("--max-bandwidth", type=_int_at_least_0, metavar="MIBPS",
                    help="cap the copy at MIBPS MiB/s, 0 = unlimited (default)")
    mv.add_argument("--priority", type=int, default=0, help="higher leaves the storage queue first (default 0)")
    mv.add_argument("--wait", action="store_true", help="wait for the end, print the report; exit 0 only if verified")
    mv.add_argument("--json", action="store_true",
                    help='print the result as JSON; an error as {"error": ..., "code": N} on stdout')
