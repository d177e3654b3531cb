"""``livemig top``: the agent's migrations and VMs, refreshed in place until q or Ctrl-C.

Running and queued jobs first, each with a bar and its figures; finished
ones folded to the last few; then the VMs with their write rate and
throttle. It stays open when there is nothing to show (and when the agent
stops answering: the frame says so and the next refresh tries again).
``--json`` writes one JSON document per refresh, one per line, for scripts
(``--count N`` stops after N).
"""
from __future__ import annotations

import json
import os
import select
import shutil
import sys
import time

from agent.cli.parser import number_in
from agent.cli.client import Control
from agent.cli.exits import EXIT_OK, CliError
from agent.cli.output import FINAL_STATES, bar, format_progress, job_fraction, progress_figures
from agent.cli.units import ago, fmt_bytes, human, iso, with_iso

FINISHED_SHOWN = 5


def snapshot(cl: Control) -> dict:
    """One refresh: what the agent says now."""
    jobs = cl.call("jobs")
    vms = cl.call("vm.list")
    active = [j for j in jobs if j.get("state") not in FINAL_STATES]
    active.sort(key=lambda j: (j.get("state") == "queued", -(j.get("priority") or 0), j.get("queued_at") or 0))
    finished = sorted((j for j in jobs if j.get("state") in FINAL_STATES),
                      key=lambda j: j.get("finished_at") or 0, reverse=True)
    return {"refreshed_at": time.time(), "active": active, "finished": finished[:FINISHED_SHOWN],
            "finished_total": len(finished), "vms": vms}


def render(snap: dict, agent: str, width: int) -> list[str]:
    active, vms = snap["active"], snap["vms"]
    running = sum(1 for j in active if j.get("state") != "queued")
    lines = [f"livemig top  {agent}  {iso(snap['refreshed_at'])}  {running} running, {len(active) - running} queued, "
             f"{len(vms)} VMs   (q quits)", ""]
    lines.append("MIGRATIONS" if active else "MIGRATIONS  none under way")
    for j in active:
        if j.get("kind") == "storage":           # a storage move: its own line (storage.py)
            lines.append(f"  {format_progress(j)}")
            continue
        arrow = "->" if j.get("direction") == "outbound" else "<-"
        peer = (j.get("destination") if j.get("direction") == "outbound" else j.get("source")) or "-"
        frac = job_fraction(j)
        lines.append(f"  {j['id']}  {j['vm']:<12} {arrow} {peer:<21} {j['state']:<13} {bar(frac, 20)} "
                     f"{frac * 100:5.1f}%")
        lines.append(f"      {progress_figures(j)}" + (f"  ({j['waiting_for']})" if j.get("waiting_for") else ""))
    if snap["finished"]:
        more = snap["finished_total"] - len(snap["finished"])
        lines += ["", f"FINISHED  (last {len(snap['finished'])}" + (f", {more} more: livemig jobs)" if more else ")")]
        for j in snap["finished"]:
            when = ago(j["finished_at"]) if j.get("finished_at") else "-"
            lines.append(f"  {j['id']}  {j['vm']:<12} {j.get('state', j.get('status')):<10} {when:>14}  "
                         f"downtime {human('downtime_ms', j.get('downtime_ms'))}  verified "
                         f"{human('verified', j.get('verified'))}" + (f"  {j['error']}" if j.get("error") else ""))
    lines += ["", "VMS" if vms else "VMS  none"]
    if vms:
        lines.append(f"  {'NAME':<16} {'STATE':<10} {'MEMORY':>10} {'WRITES/S':>10} {'THROTTLE':>9}  MIGRATION")
    for v in vms:
        lines.append(f"  {v['name']:<16} {v['state']:<10} {fmt_bytes(v['memory_bytes']):>10} "
                     f"{v.get('write_rate_pps', 0):>10} {str(v.get('throttle_pct', 0)) + '%':>9}  "
                     f"{v.get('migration') or '-'}")
    return [line[:width] for line in lines]


class _Keys:
    """Single keys from a terminal on stdin (cbreak mode, restored on exit); nothing otherwise."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
        self.saved = None

    def __enter__(self) -> "_Keys":
        if self.fd is not None:
            import termios
            import tty

            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def wait_quit(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` (the refresh period); True if q was pressed."""
        if self.fd is None:
            time.sleep(timeout_s)      # the refresh period of the display, nothing is waited for
            return False
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready and os.read(self.fd, 1) in (b"q", b"Q"):
                return True
        return False


def cmd_top(ns) -> int:
    from agent.cli.commands import _control

    cl = _control(ns)
    agent = cl.call("status")["agent"]         # an agent that does not answer at all is an error (exit 3)
    tty = sys.stdout.isatty() and not ns.json
    frames = 0
    with _Keys() as keys:
        if tty:
            sys.stdout.write("\x1b[?25l")      # hide the cursor
        try:
            while True:
                try:
                    snap = snapshot(cl)
                    error = None
                except CliError as exc:
                    snap, error = None, exc.message
                if ns.json:
                    doc = {"agent": agent, **snap} if snap else \
                        {"agent": agent, "refreshed_at": time.time(), "error": error}
                    print(json.dumps(with_iso(doc)), flush=True)
                else:
                    width = shutil.get_terminal_size((120, 40)).columns
                    lines = render(snap, agent, width) if snap else [f"livemig top  {agent}: {error}"]
                    if tty:
                        sys.stdout.write("\x1b[H\x1b[2J")
                    print("\n".join(lines), flush=True)
                    if not tty:
                        print("--", flush=True)
                frames += 1
                if ns.count and frames >= ns.count:
                    return EXIT_OK
                if keys.wait_quit(ns.interval):
                    return EXIT_OK
        except KeyboardInterrupt:
            return EXIT_OK
        finally:
            if tty:
                sys.stdout.write("\x1b[?25h\n")
                sys.stdout.flush()


def _count(text: str) -> int:
    import argparse

    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of refreshes >= 0, got {text!r}")
    return int(text)


_period = number_in(float, 0.05, 3600, "seconds")


def register(sub, command) -> None:
    t = command(sub, "top", cmd_top, "live view of the agent: migrations with bars, the last finished ones, "
                "VMs with write rate and throttle (q or Ctrl-C quits)")
    t.add_argument("--interval", type=_period, default=1.0, metavar="S", help="refresh period in seconds (default 1)")
    t.add_argument("--count", type=_count, default=0, metavar="N", help="stop after N refreshes (default: run until q)")
    t.add_argument("--json", action="store_true", help="one JSON document per refresh, one per line")
