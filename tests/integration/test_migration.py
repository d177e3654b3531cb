"""Real agents on 127.0.0.1, real sockets, real shared memory, real guest processes."""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import leftovers, wait_for

pytestmark = pytest.mark.timeout(150)


def vm_segments(prefix: str, agent: str, vm: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"{prefix}.{agent}.{vm}.")]


def guest_procs(prefix: str, agent: str, vm: str):
    return [p for p in leftovers(f"{prefix}.{agent}.{vm}.")[1]]


def writes_of(ag, vm: str) -> int:
    return ag.call("vm.show", name=vm)["writes"]


def create_vm(agents, ag, name: str, memory: str = "256M", workload: str = "hotset:ws=64M,rate=20000") -> dict:
    r = agents.cli(ag, "vm", "create", name, "--memory", memory, "--workload", workload, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["state"] == "running"
    return info


def test_migrate_hotset_256m_verified(agents, shm_prefix):
    a, b = agents("A"), agents("B")
    create_vm(agents, a, "vm1")
    wait_for(lambda: writes_of(a, "vm1") > 5000, 20, what="guest writes on A")
    listed = json.loads(agents.cli(a, "vm", "list", "--json").stdout)
    assert [v["name"] for v in listed] == ["vm1"] and listed[0]["memory_bytes"] == 256 * 2**20

    r = agents.cli(a, "migrate", "vm1", "--to", b.addr, "--wait", "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 0, (report, a.log_tail())
    assert report["status"] == "completed" and report["error"] is None
    assert report["verified"] is True
    assert report["vm"] == "vm1" and report["destination"] == b.addr
    assert report["iterations"] >= 1 and report["pages_sent"] > 0
    assert report["bytes_sent"] == report["pages_sent"] * 4096
    assert report["pages_sent"] + report["zero_pages"] >= 65536      # every page accounted for in round 1
    assert 0 < report["downtime_ms"] < report["total_ms"]
    for phase in ("negotiate", "setup", "precopy", "stop-and-copy", "verify", "resume", "commit"):
        assert phase in report["phases"], report["phases"]

    # Gone from the source, segment and guest included.
    assert json.loads(agents.cli(a, "vm", "list", "--json").stdout) == []
    assert vm_segments(shm_prefix, "A", "vm1") == []
    assert guest_procs(shm_prefix, "A", "vm1") == []
    # Running on the destination, its write counter continuing from the pause.
    info = b.call("vm.show", name="vm1")
    assert info["state"] == "running"
    assert info["writes"] >= report["writes_at_pause"]
    wait_for(lambda: writes_of(b, "vm1") > info["writes"] + 1000, 20, what="guest writes on B")

    jobs = json.loads(agents.cli(a, "jobs", "--json").stdout)
    assert [(j["vm"], j["state"], j["destination"]) for j in jobs] == [("vm1", "completed", b.addr)]
    assert {"id", "vm", "source", "destination", "state", "pages_sent"} <= set(jobs[0])
    inbound = b.call("jobs")
    assert inbound[0]["id"] == jobs[0]["id"] and inbound[0]["state"] == "completed"

    assert agents.cli(b, "vm", "delete", "vm1").returncode == 0
    assert vm_segments(shm_prefix, "B", "vm1") == []
    assert guest_procs(shm_prefix, "B", "vm1") == []


def test_kill_destination_mid_precopy_then_retry(agents, shm_prefix):
    a, b = agents("A"), agents("B")
    create_vm(agents, a, "vm1", workload="hotset:ws=64M,rate=20000")
    wait_for(lambda: writes_of(a, "vm1") > 20000, 30, what="hot set written")
    # A bandwidth cap keeps precopy long enough to kill the destination inside it.
    job = a.call("migrate", vm="vm1", to=b.addr, max_bandwidth_mibps=16)
    wait_for(lambda: (j := a.call("job.show", id=job["id"]))["status"] == "running"
             and j["phases"].get("setup") is not None and j["pages_sent"] > 256,
             30, what="precopy under way")
    assert a.call("job.show", id=job["id"])["status"] == "running"
    b.kill()
    report = a.call("job.wait", id=job["id"], timeout_s=60)
    assert report["status"] == "failed", report
    assert report["error"]
    info = a.call("vm.show", name="vm1")
    assert info["state"] == "running"
    wait_for(lambda: writes_of(a, "vm1") > info["writes"] + 1000, 20, what="writes keep growing on A")
    assert a.call("vm.show", name="vm1")["throttle_pct"] == 0

    # The killed destination left a shell behind; its restart removes it.
    agents.restart(b)
    assert vm_segments(shm_prefix, "B", "vm1") == []
    assert b.call("vm.list") == []

    report = a.call("migrate", vm="vm1", to=b.addr, wait=True, timeout_s=None)
    assert report["status"] == "completed" and report["verified"], report
    assert b.call("vm.show", name="vm1")["state"] == "running"
    b.call("vm.delete", name="vm1")


def test_source_lost_destination_discards_shell(agents, shm_prefix):
    a, b = agents("A"), agents("B")
    create_vm(agents, a, "vm1")
    wait_for(lambda: writes_of(a, "vm1") > 20000, 30, what="hot set written")
    job = a.call("migrate", vm="vm1", to=b.addr, max_bandwidth_mibps=16)
    wait_for(lambda: any(j["state"] == "precopy" and j["pages_sent"] > 256 for j in b.call("jobs")),
             30, what="inbound precopy on B")
    a.kill()                       # the source agent dies; its guest keeps running
    wait_for(lambda: b.call("jobs")[0]["state"] == "failed", 30, what="B gives up the inbound migration")
    # Nothing of the VM remains on the destination.
    assert b.call("vm.list") == []
    assert vm_segments(shm_prefix, "B", "vm1") == []
    assert guest_procs(shm_prefix, "B", "vm1") == []
    # The source agent comes back and re-adopts its still-running VM.
    agents.restart(a)
    info = a.call("vm.show", name="vm1")
    assert info["state"] == "running"
    wait_for(lambda: writes_of(a, "vm1") > info["writes"] + 1000, 20, what="adopted guest keeps writing")
    a.call("vm.delete", name="vm1")


def test_vm_delete_leaves_nothing(agents, shm_prefix):
    a = agents("A")
    info = create_vm(agents, a, "vm1", memory="64M", workload="uniform:rate=5000")
    assert vm_segments(shm_prefix, "A", "vm1") and guest_procs(shm_prefix, "A", "vm1")
    r = agents.cli(a, "vm", "delete", "vm1")
    assert r.returncode == 0, r.stderr
    assert vm_segments(shm_prefix, "A", "vm1") == []
    assert guest_procs(shm_prefix, "A", "vm1") == []
    assert not os.path.exists(os.path.join(a.data_dir, "vms", "vm1.json"))
    r = agents.cli(a, "vm", "show", "vm1")
    assert r.returncode == 1 and "no VM named" in r.stderr


def test_destination_tells_its_own_truth(agents, shm_prefix):
    """The inbound job's figures are the destination's own and agree with the source's at
    the end: pages received, rounds, and a downtime it measured itself."""
    a, b = agents("A"), agents("B")
    create_vm(agents, a, "vm1", memory="64M", workload="hotset:ws=8M,rate=5000")
    wait_for(lambda: writes_of(a, "vm1") > 2000, 20, what="guest writes on A")
    src = a.call("migrate", vm="vm1", to=b.addr, wait=True, timeout_s=None)
    assert src["status"] == "completed", src
    dst = b.call("job.show", id=src["id"])
    assert dst["direction"] == "inbound" and dst["status"] == "completed" and dst["verified"] is True
    assert dst["pages_sent"] == src["pages_sent"] and dst["zero_pages"] == src["zero_pages"]
    assert dst["iterations"] == src["iterations"] and len(dst["rounds"]) == len(src["rounds"])
    assert 0 < dst["downtime_ms"] <= src["downtime_ms"] + 1.0, (dst["downtime_ms"], src["downtime_ms"])
    assert b.call("jobs")[0]["progress_pct"] == 100.0
    b.call("vm.delete", name="vm1")
