"""Operator commands (vm.pause/resume/start), migrate/drain option checks, and the order of shutdown."""
from __future__ import annotations

import json
import os
import signal

import pytest

from agent.control.server import ControlClient
from agent.errors import AgentError
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(90)


def _record(a, vm: str) -> dict:
    with open(os.path.join(a.data_dir, "vms", f"{vm}.json")) as f:
        return json.load(f)


def test_pause_resume_through_the_control_socket(agents):
    a = agents("A")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=2000")
    ctl = ControlClient(a.control, timeout_s=30)
    info = ctl.call("vm.pause", name="vm1")
    assert info["state"] == "paused" and _record(a, "vm1")["state"] == "paused"
    assert ctl.call("vm.pause", name="vm1")["state"] == "paused"            # already paused: no change
    with pytest.raises(AgentError, match="only a running VM can be live-migrated"):
        ctl.call("migrate", vm="vm1", to="127.0.0.1:1")
    with pytest.raises(AgentError, match="its guest runs already"):
        ctl.call("vm.start", name="vm1")
    writes = ctl.call("vm.show", name="vm1")["writes"]
    info = ctl.call("vm.resume", name="vm1")
    assert info["state"] == "running" and _record(a, "vm1")["state"] == "running"
    wait_for(lambda: ctl.call("vm.show", name="vm1")["writes"] > writes + 200, 20, what="writes resume")
    with pytest.raises(AgentError, match="force: expected true/false"):
        ctl.call("vm.resume", name="vm1", force="yes")
    with pytest.raises(AgentError, match="no VM named 'nope'"):
        ctl.call("vm.pause", name="nope")
    ctl.call("vm.delete", name="vm1")


BAD_OPTIONS = [
    ({"downtime_ms": 0}, "downtime_ms: must be >= 1, got 0"),
    ({"downtime_ms": -5}, "downtime_ms: must be >= 1"),
    ({"downtime_ms": "10"}, "downtime_ms: expected an integer, got '10'"),
    ({"downtime_ms": True}, "downtime_ms: expected an integer, got True"),
    ({"downtime_ms": 1.5}, "downtime_ms: expected an integer"),
    ({"max_bandwidth_mibps": -1}, "max_bandwidth_mibps: must be >= 0, got -1"),
    ({"max_bandwidth_mibps": "fast"}, "max_bandwidth_mibps: expected an integer"),
    ({"verify": "bogus"}, "verify: incremental or full, got 'bogus'"),
    ({"verify": 1}, "verify: incremental or full"),
    ({"priority": "high"}, "priority: expected an integer, got 'high'"),
    ({"priority": 2.5}, "priority: expected an integer"),
]


def test_migrate_and_drain_check_their_options_before_any_job(agents):
    a = agents("A")
    a.call("vm.create", name="vm1", memory="16M", workload="idle")
    for opts, message in BAD_OPTIONS:
        with pytest.raises(AgentError) as exc:
            a.call("migrate", vm="vm1", to="127.0.0.1:1", **opts)
        assert message in str(exc.value), (opts, str(exc.value))
        with pytest.raises(AgentError) as exc:
            a.call("drain", to=["127.0.0.1:1"], **opts)
        assert message in str(exc.value), (opts, str(exc.value))
    with pytest.raises(AgentError, match="drain needs at least one target"):
        a.call("drain", to=[])
    assert a.call("jobs") == []
    st = a.call("status")
    assert st["maintenance"] is False and st["shutting_down"] is False     # a refused drain changed nothing
    assert a.call("vm.show", name="vm1")["state"] == "running"
    a.call("vm.delete", name="vm1")


def test_valid_options_reach_the_job(agents):
    a, b = agents("A"), agents("B")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=2000")
    report = a.call("migrate", vm="vm1", to=b.addr, wait=True, timeout_s=None, downtime_ms=500,
                    max_bandwidth_mibps=0, verify="full", priority=3)
    assert report["status"] == "completed", report
    assert a.call("vm.list") == [] and [v["name"] for v in b.call("vm.list")] == ["vm1"]
    b.call("vm.delete", name="vm1")


def test_shutdown_refuses_new_migrations_and_lets_the_running_one_finish(agents):
    a, b = agents("A"), agents("B")
    a.call("vm.create", name="vm1", memory="64M", workload="uniform:rate=2000", prefill="random")
    a.call("vm.create", name="vm2", memory="16M", workload="idle")
    job = a.call("migrate", vm="vm1", to=b.addr, max_bandwidth_mibps=24)      # ~3 s of pages
    wait_for(lambda: a.call("job.show", id=job["id"])["pages_sent"] > 256, 30, what="the migration moves pages")
    a.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: a.call("status")["shutting_down"], 10, what="shutdown begun")
    with pytest.raises(AgentError, match="agent shutting down"):
        a.call("migrate", vm="vm2", to=b.addr)
    with pytest.raises(AgentError, match="agent shutting down"):
        a.call("drain", to=[b.addr])
    assert a.proc.wait(30) == 0                                                 # within the 10 s grace
    # The migration under way was not cut short: it completed, and vm2 stayed on A.
    assert [v["name"] for v in b.call("vm.list")] == ["vm1"]
    assert b.call("vm.show", name="vm1")["state"] == "running"
    a.start()
    assert [v["name"] for v in a.call("vm.list")] == ["vm2"]
    a.call("vm.delete", name="vm2")
    b.call("vm.delete", name="vm1")


def test_inbound_migration_gets_the_same_grace(agents):
    """A destination told to stop lets the migration it receives finish (not cut after 1 s)."""
    a, b = agents("A"), agents("B")
    a.call("vm.create", name="vm1", memory="64M", workload="uniform:rate=2000", prefill="random")
    job = a.call("migrate", vm="vm1", to=b.addr, max_bandwidth_mibps=24)      # ~3 s of pages
    wait_for(lambda: a.call("job.show", id=job["id"])["pages_sent"] > 256, 30, what="the migration moves pages")
    b.proc.send_signal(signal.SIGTERM)
    assert a.call("job.wait", id=job["id"], timeout_s=60)["status"] == "completed"
    assert b.proc.wait(30) == 0
    assert a.call("vm.list") == []
    b.start()
    assert [(v["name"], v["state"]) for v in b.call("vm.list")] == [("vm1", "running")]
    b.call("vm.delete", name="vm1")
