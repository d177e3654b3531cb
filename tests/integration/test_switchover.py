"""The pause has a deadline: a destination frozen during the switchover cannot hold the VM (issue 8).

A is held at the entry of stop-and-copy (testhooks), B is SIGSTOPped, the
hold is released: A pauses its guest, sends the rest and waits for B's
digests, which never come. After ``migration.switchover_timeout_ms``
(1500 ms; io_timeout_s is 10 s, so only the deadline can end it) the job
fails with an error that names the switchover deadline, and the guest on A
runs again. After SIGCONT, B discards its copy. The VM never ran on B
(RunMonitor) and there were never two running copies.
"""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from agent.migration import testhooks
from tests.conftest import wait_for
from tests.tools.checks import (
    RunMonitor,
    assert_keeps_writing,
    call,
    eventually,
    free_addr,
    running_copies,
    segments,
    settled,
    writes,
)

pytestmark = pytest.mark.timeout(60)

VM = "vm1"
SWITCHOVER_MS = 1500
CONFIG = ("--set", f"migration.switchover_timeout_ms={SWITCHOVER_MS}", "--set", "migration.io_timeout_s=10",
          "--set", "migration.handshake_timeout_s=3", "--set", "migration.resolve_timeout_s=15")


def test_frozen_destination_during_stop_and_copy_is_bounded_by_the_switchover_deadline(agents, shm_prefix):
    a = agents("A", *CONFIG, listen=free_addr(), env={testhooks.ENV: "source:stop-and-copy"})
    b = agents("B", *CONFIG, listen=free_addr())
    a.call("vm.create", name=VM, memory="32M", workload="hotset:ws=4M,rate=2000")
    wait_for(lambda: writes(a, VM) > 200, 20, what="guest writes on A")
    with RunMonitor(shm_prefix) as mon:
        job = a.call("migrate", vm=VM, to=b.addr)
        held = testhooks.hold_path(a.data_dir, "source", "stop-and-copy")
        wait_for(lambda: os.path.exists(held), 20, what="A held at stop-and-copy")
        w0 = writes(a, VM)
        b.proc.send_signal(signal.SIGSTOP)
        try:
            os.unlink(held)                       # A pauses its guest now and waits on the frozen B
            seg = a.call("vm.show", name=VM)["segment"]
            wait_for(lambda: seg not in running_copies(shm_prefix), 10, interval_s=0.002, what="A's guest paused")
            t_paused = time.monotonic()
            wait_for(lambda: seg in running_copies(shm_prefix), 15, interval_s=0.002, what="A's guest runs again")
            pause_s = time.monotonic() - t_paused
            report = wait_for(lambda: (r := call(a, "job.show", id=job["id"]))["status"] != "running" and r,
                              10, what="A's job ends")
            assert report["status"] == "failed", report
            assert re.search(r"switchover deadline", report["error"] or "", re.I), report["error"]
            # The pause is bounded by the deadline, and was ended by it (not by the 10 s io timeout).
            assert SWITCHOVER_MS / 1000 * 0.8 <= pause_s <= SWITCHOVER_MS / 1000 + 2.0, pause_s
            info = a.call("vm.show", name=VM)
            assert info["state"] == "running" and info["throttle_pct"] == 0, info
            assert_keeps_writing(a, VM, max(w0, info["writes"]))      # the guest on A writes again
        finally:
            b.proc.send_signal(signal.SIGCONT)
        # B wakes up, finds the source gone and discards its copy.
        eventually(lambda: settled([a, b], VM, shm_prefix, min_writes=w0, hosts="A"), 20,
                   what="B discards its copy")
        inbound = [j for j in call(b, "jobs") if j["id"] == job["id"]]
        assert inbound and inbound[0]["state"] == "failed", inbound
        assert segments(shm_prefix, "B") == set()
        mon.stop()
        mon.check()
        assert mon.ran_on("B") == set(), mon.ran_on("B")
    a.call("vm.delete", name=VM)
