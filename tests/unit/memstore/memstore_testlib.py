"""Helpers shared by the memstore tests (a uniquely named module, so that
test files can import it without a package __init__)."""

from __future__ import annotations

import time
from collections.abc import Callable

from memstore.control import Cmd
from memstore.segment import GuestRam

WAIT_S = 5.0


def wait_for(cond: Callable[[], object], timeout_s: float = WAIT_S, poll_s: float = 0.001,
             what: str = "condition") -> object:
    """Poll ``cond`` until it returns a truthy value (returned) or fail."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def command(ram: GuestRam, cmd: Cmd, timeout_s: float = WAIT_S) -> float:
    """Issue ``cmd`` and wait for its acknowledgement; returns the latency in s."""
    t0 = time.perf_counter()
    seq = ram.ctl.command(cmd)
    assert ram.ctl.wait_acknowledged(seq, timeout_s, poll_s=0.0002), f"{cmd.name} not acknowledged"
    return time.perf_counter() - t0
