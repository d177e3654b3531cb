"""A switchover whose answer is lost for longer than resolve_timeout_s: the
source job ends failed, its frozen copy stays paused and says why, and the
agent keeps asking until the destination answers; never two running copies."""
from __future__ import annotations

import os

import pytest

from agent.migration import testhooks
from tests.conftest import wait_for
from tests.tools.checks import RunMonitor, call, eventually, free_addr, settled

pytestmark = pytest.mark.timeout(120)
FAST = ("--set", "migration.io_timeout_s=2", "--set", "migration.resolve_timeout_s=1",
        "--set", "migration.switchover_timeout_ms=60000")


def test_unanswered_switchover_waits_paused_then_resolves(agents, shm_prefix):
    """B got Resume (A cannot know whether its guest started) and goes down for longer than
    A's resolve window: A's job fails, vm1 stays paused on A and says whom it waits for; once
    B is back it answers (it never took the VM: its shell is discarded at start) and A resumes."""
    a = agents("A", *FAST, listen=free_addr())
    b = agents("B", *FAST, listen=free_addr(), env={"LIVEMIG_TEST_HOLD": "destination:resume"})
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=2000")
    with RunMonitor(shm_prefix) as mon:
        job = a.call("migrate", vm="vm1", to=b.addr)
        held = testhooks.hold_path(b.data_dir, "destination", "resume")
        wait_for(lambda: os.path.exists(held), 30, what="B got Resume and holds before its guest runs")
        b.kill()                                  # A sent Resume and hears nothing more
        report = a.call("job.wait", id=job["id"], timeout_s=60)
        assert report["status"] == "failed" and "keeps asking" in report["error"], report
        info = call(a, "vm.show", name="vm1")
        assert info["state"] == "paused" and b.addr in info["reason"], info
        os.unlink(held)
        b.env.pop("LIVEMIG_TEST_HOLD", None)
        agents.restart(b)                          # same address: A's resolver reaches it
        eventually(lambda: settled([a, b], "vm1", shm_prefix, hosts={"A"}), 30, what="A resumed once B answered")
        mon.check()
    assert "reason" not in call(a, "vm.show", name="vm1")          # resolved: nothing to wait for
    a.call("vm.delete", name="vm1")
