"""Waiting for migrations: a live progress display on stderr, and Ctrl-C.

``wait_jobs`` runs the blocking control call that ends with the migration
(``job.wait``, ``drain`` with wait) in a background thread, and meanwhile
polls the agent for the jobs' progress every ``POLL_S`` (one ``jobs`` call,
never one per 10 ms) and draws one line per job on stderr: phase, round,
sent and left in binary units, rate and dirty rate in MiB/s, expected
downtime, ETA. Nothing is drawn, and nothing polled, unless stderr is a
terminal, so pipes and files get only the result.

Ctrl-C once cancels the migrations waited on (the VMs stay on this host)
and says so; Ctrl-C again detaches: the CLI exits 130 and the migrations go
on (``livemig job ID --wait`` follows one again).
"""
from __future__ import annotations

import shutil
import sys
import threading
from typing import Any, Callable

from agent.cli.exits import EXIT_INTERRUPTED, CliError
from agent.cli.output import FINAL_STATES, bar, job_fraction, note, progress_figures

POLL_S = 0.5


class Detached(CliError):
    """The second Ctrl-C: the CLI stops waiting; the migrations go on."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_INTERRUPTED)


def progress_line(j: dict) -> str:
    if j.get("kind") == "storage":               # a storage move has its own figures (storage.py)
        from agent.cli.output import format_progress

        return format_progress(j)
    arrow = "->" if j.get("direction") == "outbound" else "<-"
    peer = (j.get("destination") if j.get("direction") == "outbound" else j.get("source")) or "-"
    frac = job_fraction(j)
    waiting = f"  ({j['waiting_for']})" if j.get("waiting_for") else ""
    return f"{j['vm']} {arrow} {peer}  {j['state']}  {bar(frac, 16)} {frac * 100:3.0f}%  {progress_figures(j)}{waiting}"


class ProgressDisplay:
    """Lines redrawn in place on a terminal (each cut to the terminal's width, so none wraps)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.drawn = 0

    def draw(self, lines: list[str]) -> None:
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        out = ["\r\x1b[K" + "\x1b[1A\x1b[K" * max(0, self.drawn - 1)]
        out.append("\n".join(line[:width] for line in lines))
        self.stream.write("".join(out))
        self.stream.flush()
        self.drawn = len(lines)

    def clear(self) -> None:
        if self.drawn:
            self.draw([""])
            self.drawn = 0


class _Call(threading.Thread):
    """A blocking call in the background; ``result()`` returns its value or raises its exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:          # handed to the main thread
            self.error = exc
        finally:
            self.finished.set()

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _names(jobs: list[dict]) -> str:
    return ", ".join(f"{j['id']} ({j['vm']})" for j in jobs) or "the migration"


def _poll(poll: Callable[[], list[dict]], last: list[dict]) -> list[dict]:
    try:
        return poll()
    except CliError:
        return last                 # a missed refresh: the waited-on call itself says what failed


def wait_jobs(call: Callable[[], Any], poll: Callable[[], list[dict]], cancel: Callable[[dict], Any],
              *, show: bool | None = None, poll_s: float = POLL_S) -> Any:
    """Return ``call()``'s result, drawing ``poll()``'s jobs meanwhile (on a terminal) and
    turning Ctrl-C into ``cancel(job)`` for each job under way (twice: ``Detached``)."""
    show = sys.stderr.isatty() if show is None else show
    display = ProgressDisplay()
    main = _Call(call)
    main.start()
    cancels: list[_Call] = []
    interrupts = 0
    jobs: list[dict] = []
    while not main.finished.is_set():
        try:
            if show or not jobs:                      # off a terminal: only until the jobs are known
                jobs = _poll(poll, jobs)
                if show and not main.finished.is_set():
                    display.draw([progress_line(j) for j in jobs] or ["waiting for the agent ..."])
            for c in [c for c in cancels if c.finished.is_set()]:
                cancels.remove(c)
                if c.error is not None:
                    display.clear()
                    note(f"cannot cancel: {c.error}")
            main.finished.wait(poll_s)
        except KeyboardInterrupt:
            interrupts += 1
            display.clear()
            try:
                if interrupts == 1:
                    jobs = _poll(poll, jobs)
                    under_way = [j for j in jobs if j.get("state") not in FINAL_STATES]
                    note(f"Ctrl-C: cancelling {_names(under_way)}; the VMs stay here (Ctrl-C again to detach)")
                    for j in under_way:
                        c = _Call(lambda j=j: cancel(j))
                        c.start()
                        cancels.append(c)
                    continue
            except KeyboardInterrupt:         # the second one came while the first was handled
                pass
            under_way = [j for j in jobs if j.get("state") not in FINAL_STATES]
            raise Detached(f"detached: {_names(under_way)} goes on; "
                           f"follow it with 'livemig job ID --wait'") from None
    display.clear()
    return main.result()
