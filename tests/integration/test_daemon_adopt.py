"""What a (re)starting agent does with what it finds: it never deletes a VM's only copy,
it removes only the segments its journal proves it created, and it keeps paused VMs paused."""
from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from agent.errors import AgentError
from memstore import GuestRam
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(90)


def _record_path(a, vm: str) -> str:
    return os.path.join(a.data_dir, "vms", f"{vm}.json")


def _record(a, vm: str) -> dict:
    with open(_record_path(a, vm)) as f:
        return json.load(f)


def _edit_record(a, vm: str, **changes) -> None:
    rec = _record(a, vm)
    rec.update(changes)
    with open(_record_path(a, vm), "w") as f:
        json.dump(rec, f)


def _kill_guest(pid: int) -> None:
    try:
        p = psutil.Process(pid)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    except psutil.NoSuchProcess:
        pass


def _segments(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


def _agent_with_vms(agents, *names: str):
    a = agents("A")
    for n in names:
        a.call("vm.create", name=n, memory="16M", workload="uniform:rate=2000")
    wait_for(lambda: all(a.call("vm.show", name=n)["writes"] > 200 for n in names), 20, what="writes")
    return a, {n: a.call("vm.show", name=n) for n in names}


def test_unattachable_segment_gives_a_broken_vm_and_nothing_is_unlinked(agents, shm_prefix):
    a, vms = _agent_with_vms(agents, "vm1", "vm2")
    a.kill()
    _kill_guest(vms["vm1"]["guest_pid"])
    os.unlink(f"/dev/shm/{vms['vm1']['segment']}")             # vm1's memory is gone
    stranger = GuestRam.create(f"{shm_prefix}.A.stranger.00000000", 4096 * 4)   # not made by this agent
    stranger.close()
    try:
        before = _segments(shm_prefix)
        a.start()
        assert _segments(shm_prefix) == before                  # nothing unlinked, the stranger included
        vm1 = a.call("vm.show", name="vm1")
        assert vm1["state"] == "broken" and "does not attach" in vm1["broken_reason"]
        assert vm1["reason"] == vm1["broken_reason"]
        assert _record(a, "vm1")["state"] == "broken"           # kept, with the reason, not deleted
        assert a.call("vm.show", name="vm2")["guest_pid"] == vms["vm2"]["guest_pid"]     # adopted as is
        assert {v["name"]: v["state"] for v in a.call("vm.list")} == {"vm1": "broken", "vm2": "running"}
        with pytest.raises(AgentError, match="still broken"):
            a.call("vm.start", name="vm1")
        with pytest.raises(AgentError, match="broken"):
            a.call("migrate", vm="vm1", to="127.0.0.1:1")
        a.call("vm.delete", name="vm1")                         # the operator may drop it
        assert not os.path.exists(_record_path(a, "vm1"))
        a.call("vm.delete", name="vm2")
    finally:
        os.unlink(f"/dev/shm/{shm_prefix}.A.stranger.00000000")


def test_broken_vm_starts_once_its_segment_attaches_again(agents, shm_prefix):
    a, vms = _agent_with_vms(agents, "vm1")
    a.kill()
    _kill_guest(vms["vm1"]["guest_pid"])
    seg = f"/dev/shm/{vms['vm1']['segment']}"
    hidden = f"/dev/shm/{shm_prefix}-hidden"
    os.rename(seg, hidden)
    try:
        a.start()
        assert a.call("vm.show", name="vm1")["state"] == "broken"
    finally:
        os.rename(hidden, seg)
    info = a.call("vm.start", name="vm1")
    assert info["state"] == "running" and info["writes"] >= vms["vm1"]["writes"] and "broken_reason" not in info
    wait_for(lambda: a.call("vm.show", name="vm1")["writes"] > info["writes"] + 200, 20, what="writes go on")
    assert _record(a, "vm1")["state"] == "running"
    a.call("vm.delete", name="vm1")


def test_sweep_removes_only_journaled_orphans(agents, shm_prefix):
    a, vms = _agent_with_vms(agents, "vm1", "vm2")
    a.kill()
    _kill_guest(vms["vm1"]["guest_pid"])
    os.unlink(_record_path(a, "vm1"))                           # vm1's segment: ours (journal), no record
    foreign = GuestRam.create(f"{shm_prefix}.A.foreign.00000000", 4096 * 4)
    foreign.close()
    try:
        a.start()
        assert not os.path.exists(f"/dev/shm/{vms['vm1']['segment']}")
        assert os.path.exists(f"/dev/shm/{shm_prefix}.A.foreign.00000000")
        with open(os.path.join(a.data_dir, "segments")) as f:
            assert f.read().split() == [vms["vm2"]["segment"]]
        assert [v["name"] for v in a.call("vm.list")] == ["vm2"]
        a.call("vm.delete", name="vm2")
        with open(os.path.join(a.data_dir, "segments")) as f:
            assert f.read().split() == []                       # dropped when unlinked
    finally:
        os.unlink(f"/dev/shm/{shm_prefix}.A.foreign.00000000")


def test_incoming_shell_is_discarded_with_its_guest_log(agents, shm_prefix):
    a, vms = _agent_with_vms(agents, "vm1")
    a.kill()
    _edit_record(a, "vm1", state="incoming")                    # as a destination killed mid-migration leaves it
    log = os.path.join(a.data_dir, "guests", "vm1.log")
    assert os.path.exists(log)
    a.start()
    assert a.call("vm.list") == []
    assert _segments(f"{shm_prefix}.A.") == [] and not os.path.exists(log)
    assert not psutil.pid_exists(vms["vm1"]["guest_pid"]) or \
        psutil.Process(vms["vm1"]["guest_pid"]).status() == psutil.STATUS_ZOMBIE


def test_paused_vm_stays_paused_and_throttle_is_reset(agents):
    a, vms = _agent_with_vms(agents, "vm1")
    a.call("vm.pause", name="vm1")
    assert _record(a, "vm1")["state"] == "paused"
    with GuestRam.attach(vms["vm1"]["segment"]) as ram:
        ram.ctl.throttle_pct = 40                               # as a migration that died left it
    assert a.stop() == 0
    a.start()
    info = a.call("vm.show", name="vm1")
    assert info["state"] == "paused" and info["throttle_pct"] == 0 and "reason" not in info
    a.call("vm.resume", name="vm1")
    a.call("vm.delete", name="vm1")


def test_vm_paused_by_an_unresolved_switchover_needs_force(agents):
    a, vms = _agent_with_vms(agents, "vm1")
    a.call("vm.pause", name="vm1")
    a.kill()
    # As the source leaves it when it dies during the switchover to a destination that is gone.
    _edit_record(a, "vm1", outbound={"id": "0123456789ab", "peer": "127.0.0.1:1", "phase": "resume"})
    a.start()
    info = wait_for(lambda: (v := a.call("vm.show", name="vm1")).get("reason") and v, 10, what="a reason")
    assert info["state"] == "paused" and "127.0.0.1:1" in info["reason"]      # it says what it waits for
    with pytest.raises(AgentError) as exc:
        a.call("vm.resume", name="vm1")
    assert str(exc.value) == ("vm1 is paused because its migration to 127.0.0.1:1 is unresolved: the destination "
                              "may be running it; resuming here with --force can leave two running copies")
    assert a.call("vm.show", name="vm1")["state"] == "paused"
    info = a.call("vm.resume", name="vm1", force=True)
    assert info["state"] == "running" and "reason" not in info
    assert _record(a, "vm1")["outbound"] is None and _record(a, "vm1")["state"] == "running"
    wait_for(lambda: a.call("vm.show", name="vm1")["writes"] > info["writes"] + 200, 20, what="writes")
    a.call("vm.delete", name="vm1")


def test_guest_running_on_the_segment_is_adopted_even_if_the_record_missed_its_pid(agents, shm_prefix):
    """An agent killed between launching a guest and saving its pid: the next start finds that guest by its
    segment instead of starting a second one on the same memory."""
    a, vms = _agent_with_vms(agents, "vm1")
    a.kill()
    _edit_record(a, "vm1", guest_pid=0)
    a.start()
    info = a.call("vm.show", name="vm1")
    assert info["guest_pid"] == vms["vm1"]["guest_pid"] and info["guest_restarts"] == 0
    guests = [p for p in psutil.process_iter(["cmdline"]) if vms["vm1"]["segment"] in (p.info["cmdline"] or [])]
    assert [p.pid for p in guests] == [vms["vm1"]["guest_pid"]]
    a.call("vm.delete", name="vm1")
