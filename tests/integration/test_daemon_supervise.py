"""A guest that dies (or hangs) while its agent runs comes back from its memory, without an agent restart."""
from __future__ import annotations

import os
import signal

import psutil
import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(90)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _replaced(a, name: str, old_pid: int, restarts: int = 1):
    def cond():
        v = a.call("vm.show", name=name)
        return v if v["guest_pid"] != old_pid and v["guest_restarts"] == restarts and v["state"] != "stopped" else None
    return cond


def test_killed_guest_is_restarted_and_writes_continue(agents):
    a = agents("A")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=2000")
    wait_for(lambda: a.call("vm.show", name="vm1")["writes"] > 500, 20, what="writes")
    before = a.call("vm.show", name="vm1")
    assert before["guest_restarts"] == 0
    os.kill(before["guest_pid"], signal.SIGKILL)
    info = wait_for(_replaced(a, "vm1", before["guest_pid"]), 20, what="a new guest")
    assert info["state"] == "running" and info["writes"] >= before["writes"]     # from the counter in its segment
    wait_for(lambda: a.call("vm.show", name="vm1")["writes"] > info["writes"] + 500, 20, what="writes go on")
    assert a.alive() and a.call("ping")["pid"] == a.proc.pid                     # the same agent
    assert [v["guest_restarts"] for v in a.call("vm.list")] == [1]
    a.call("vm.delete", name="vm1")


def test_killed_paused_guest_comes_back_paused(agents):
    a = agents("A")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=2000")
    wait_for(lambda: a.call("vm.show", name="vm1")["writes"] > 200, 20, what="writes")
    paused = a.call("vm.pause", name="vm1")
    assert paused["state"] == "paused"
    os.kill(paused["guest_pid"], signal.SIGKILL)
    info = wait_for(_replaced(a, "vm1", paused["guest_pid"]), 20, what="a new guest")
    assert info["state"] == "paused" and info["writes"] == a.call("vm.show", name="vm1")["writes"]
    resumed = a.call("vm.resume", name="vm1")
    assert resumed["state"] == "running"
    wait_for(lambda: a.call("vm.show", name="vm1")["writes"] > resumed["writes"] + 200, 20, what="writes resume")
    a.call("vm.delete", name="vm1")


def test_hung_guest_is_replaced_after_heartbeat_timeout(agents):
    a = agents("A", "--set", "migration.guest_heartbeat_timeout_s=1")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=2000")
    before = a.call("vm.show", name="vm1")
    os.kill(before["guest_pid"], signal.SIGSTOP)          # alive, but its heartbeat stops
    try:
        info = wait_for(_replaced(a, "vm1", before["guest_pid"]), 30, what="the hung guest replaced")
    finally:
        if not _gone(before["guest_pid"]):
            os.kill(before["guest_pid"], signal.SIGCONT)
    assert info["state"] == "running"
    wait_for(lambda: _gone(before["guest_pid"]), 10, what="the hung guest killed")
    wait_for(lambda: a.call("vm.show", name="vm1")["writes"] > info["writes"] + 200, 20, what="writes go on")
    a.call("vm.delete", name="vm1")


def test_vm_delete_removes_its_guest_log(agents, shm_prefix):
    a = agents("A")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=2000")
    pid = a.call("vm.show", name="vm1")["guest_pid"]
    log = os.path.join(a.data_dir, "guests", "vm1.log")
    assert os.path.exists(log)
    a.call("vm.delete", name="vm1")
    assert _gone(pid) and not os.path.exists(log)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"{shm_prefix}.A.vm1.")]
