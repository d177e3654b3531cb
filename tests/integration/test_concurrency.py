"""Several migrations at once: host limits, pair limits, queueing, drain and cancel."""
from __future__ import annotations

import json
import os
import threading

import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(180)

ACTIVE = {"negotiate", "setup", "precopy", "stop-and-copy", "verify", "resume", "commit", "cancelling", "rolling-back"}


class Sampler(threading.Thread):
    """Polls every agent's jobs until stopped; keeps the worst counts it saw."""

    def __init__(self, agents: dict) -> None:
        super().__init__(daemon=True)
        self.agents = agents
        self.stop = threading.Event()
        self.max_host: dict[str, int] = {n: 0 for n in agents}
        self.max_pair: dict[tuple[str, str], int] = {}
        self.samples = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        addr_to_name = {ag.addr: n for n, ag in self.agents.items()}
        try:
            while not self.stop.is_set():
                for name, ag in self.agents.items():
                    jobs = [j for j in ag.call("jobs") if j["state"] in ACTIVE]
                    self.max_host[name] = max(self.max_host[name], len(jobs))
                    for j in jobs:
                        if j["direction"] == "outbound":
                            pair = (name, addr_to_name.get(j["destination"], j["destination"]))
                        else:
                            pair = (j["source"], name)
                        n = sum(1 for k in jobs if k["direction"] == j["direction"]
                                and (k["destination"] if k["direction"] == "outbound" else k["source"])
                                == (j["destination"] if j["direction"] == "outbound" else j["source"]))
                        self.max_pair[pair] = max(self.max_pair.get(pair, 0), n)
                self.samples += 1
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def make_vms(ag, n: int, memory: str = "32M") -> list[str]:
    names = [f"vm{i}" for i in range(n)]
    for name in names:
        ag.call("vm.create", name=name, memory=memory, workload="uniform:rate=2000", prefill="random",
                timeout_s=120)
    return names


def test_limits_hold_for_every_host_and_pair(agents):
    a = agents("A", "--max-live-migrations", "5")
    b = agents("B", "--max-live-migrations", "2")
    c = agents("C", "--max-live-migrations", "3")
    names = make_vms(a, 8)
    sampler = Sampler({"A": a, "B": b, "C": c})
    sampler.start()
    try:
        jobs = [a.call("migrate", vm=n, to=(b if i % 2 == 0 else c).addr, max_bandwidth_mibps=48)
                for i, n in enumerate(names)]
        reports = [a.call("job.wait", id=j["id"], timeout_s=150) for j in jobs]
    finally:
        sampler.stop.set()
        sampler.join(10)
    assert sampler.error is None, sampler.error
    assert sampler.samples > 10
    assert all(r["status"] == "completed" and r["verified"] for r in reports), [
        (r["vm"], r["status"], r["error"]) for r in reports]
    assert sampler.max_host["A"] <= 5 and sampler.max_host["B"] <= 2 and sampler.max_host["C"] <= 3, sampler.max_host
    # Per pair: min of the two limits, from either end's point of view.
    limits = {"A": 5, "B": 2, "C": 3}
    for (src, dst), n in sampler.max_pair.items():
        s = next(k for k in limits if k == src or src.startswith(k))
        assert n <= min(limits.get(src, limits[s]), limits[dst if dst in limits else s]), (src, dst, n)
    assert sampler.max_host["A"] >= 3, sampler.max_host     # they did run concurrently
    # Jobs carry what is needed to reconstruct concurrency afterwards.
    for r in reports:
        assert r["queued_at"] <= r["started_at"] <= r["finished_at"]
    for ag, n in ((b, 4), (c, 4)):
        vms = ag.call("vm.list")
        assert len(vms) == n and all(v["state"] == "running" for v in vms)
        for v in vms:
            ag.call("vm.delete", name=v["name"])


def test_drain_spreads_vms_and_refuses_inbound(agents):
    a = agents("A", "--max-live-migrations", "2")
    b = agents("B", "--max-live-migrations", "2")
    c = agents("C", "--max-live-migrations", "2")
    make_vms(a, 6)
    r = agents.cli(a, "drain", "--to", b.addr, "--to", c.addr, "--wait", "--json", timeout_s=150)
    report = json.loads(r.stdout)
    assert r.returncode == 0, report
    assert report["status"] == "completed" and report["vms_left"] == []
    assert len(report["vms"]) == 6 and all(v["status"] == "completed" and v["verified"] for v in report["vms"])
    spread = {v["destination"] for v in report["vms"]}
    assert spread == {b.addr, c.addr}, report["vms"]
    assert a.call("vm.list") == []
    # In maintenance A takes no VM, with a clear reason.
    b.call("vm.create", name="back", memory="16M", workload="idle")
    refused = b.call("migrate", vm="back", to=a.addr, wait=True, timeout_s=None)
    assert refused["status"] == "failed" and "maintenance" in refused["error"], refused
    assert b.call("vm.show", name="back")["state"] == "running"
    a.call("undrain")
    back = b.call("migrate", vm="back", to=a.addr, wait=True, timeout_s=None)
    assert back["status"] == "completed", back
    a.call("vm.delete", name="back")
    for ag in (b, c):
        for v in ag.call("vm.list"):
            ag.call("vm.delete", name=v["name"])


def test_cancel_in_precopy_and_in_queue(agents, shm_prefix):
    a = agents("A", "--max-live-migrations", "1")
    b = agents("B")
    make_vms(a, 2, memory="64M")
    first = a.call("migrate", vm="vm0", to=b.addr, max_bandwidth_mibps=8)
    second = a.call("migrate", vm="vm1", to=b.addr)
    wait_for(lambda: a.call("job.show", id=first["id"])["phases"].get("setup") is not None
             and a.call("job.show", id=first["id"])["pages_sent"] > 512, 30, what="first job in precopy")
    assert a.call("job.show", id=second["id"])["status"] == "running"
    assert [j["state"] for j in a.call("jobs") if j["id"] == second["id"]] == ["queued"]

    r = agents.cli(a, "cancel", second["id"], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "cancelled"
    r = agents.cli(a, "cancel", first["id"], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "cancelled"

    for name in ("vm0", "vm1"):
        info = a.call("vm.show", name=name)
        assert info["state"] == "running", info
        wait_for(lambda: a.call("vm.show", name=name)["writes"] > info["writes"] + 200, 20, what="writes grow")
    # The destination discarded its shell and the slot is free again.
    wait_for(lambda: b.call("vm.list") == [] and b.call("status")["live_migrations_running"] == 0, 20,
             what="destination cleaned up")
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"{shm_prefix}.B.")]
    assert a.call("status")["live_migrations_running"] == 0
    again = a.call("migrate", vm="vm1", to=b.addr, wait=True, timeout_s=None)
    assert again["status"] == "completed"
    b.call("vm.delete", name="vm1")
    a.call("vm.delete", name="vm0")


def test_limits_change_at_run_time(agents):
    a = agents("A")
    r = agents.cli(a, "config", "set", "max-live-migrations", "5", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"max_live_migrations": 5}
    assert a.call("status")["max_live_migrations"] == 5
    r = agents.cli(a, "config", "set", "max-storage-migrations", "3")
    assert r.returncode == 0 and a.call("status")["max_storage_migrations"] == 3
    r = agents.cli(a, "config", "set", "max-live-migrations", "0")
    assert r.returncode == 1 and "1..1024" in r.stderr
