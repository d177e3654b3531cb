"""An agent restart keeps its VMs running and removes what it no longer owns."""
from __future__ import annotations

import os

import pytest

from memstore import GuestRam
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(90)


def test_graceful_restart_readopts_vms_and_removes_orphans(agents, shm_prefix):
    a = agents("A")
    a.call("vm.create", name="vm1", memory="32M", workload="uniform:rate=2000")
    pid = a.call("vm.show", name="vm1")["guest_pid"]
    # An orphan: a segment this agent created (its journal says so) that no record owns,
    # and a foreign one with the same prefix that the journal does not list (kept).
    with open(os.path.join(a.data_dir, "segments"), "a") as f:
        f.write(f"{shm_prefix}.A.ghost.deadbeef\n")
    orphan = GuestRam.create(f"{shm_prefix}.A.ghost.deadbeef", 4096 * 16)
    orphan.close()
    foreign = GuestRam.create(f"{shm_prefix}.A.foreign.cafef00d", 4096 * 16)
    foreign.close()
    assert a.stop() == 0                       # SIGTERM: graceful, VMs stay up
    assert os.path.exists(f"/proc/{pid}")      # the guest outlived its agent
    a.start()
    info = a.call("vm.show", name="vm1")
    assert info["state"] == "running" and info["guest_pid"] == pid      # adopted, not restarted
    wait_for(lambda: a.call("vm.show", name="vm1")["writes"] > info["writes"] + 500, 20, what="writes go on")
    assert not os.path.exists(f"/dev/shm/{shm_prefix}.A.ghost.deadbeef")
    assert os.path.exists(f"/dev/shm/{shm_prefix}.A.foreign.cafef00d")     # not proven ours: kept
    foreign.unlink()
    a.call("vm.delete", name="vm1")


def test_restart_replaces_a_dead_guest_from_its_memory(agents, shm_prefix):
    a = agents("A")
    a.call("vm.create", name="vm1", memory="32M", workload="uniform:rate=2000")
    wait_for(lambda: a.call("vm.show", name="vm1")["writes"] > 1000, 20, what="writes")
    a.kill()
    pid = None
    for n in os.listdir("/proc"):
        if n.isdigit():
            try:
                with open(f"/proc/{n}/cmdline", "rb") as f:
                    if f"{shm_prefix}.A.vm1.".encode() in f.read():
                        pid = int(n)
            except OSError:
                pass
    assert pid is not None
    os.kill(pid, 9)                            # the VM's guest dies while its agent is down
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
             10, what="guest gone")
    a.start()
    info = a.call("vm.show", name="vm1")
    assert info["state"] == "running" and info["guest_pid"] != pid
    assert info["writes"] > 1000                # continues from the counter kept in its segment
    a.call("vm.delete", name="vm1")
