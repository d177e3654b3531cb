"""CPU and network compatibility (the platform section): a destination that
presents another CPU vendor, or lacks a flag, or is not connected to one of the
VM's networks, refuses before anything is built (in a dry run too), naming what
is missing; --cpu compat and --allow-network-change migrate."""
from __future__ import annotations

import os

import pytest

from agent.daemon.platform import COMPAT_FLAGS, read_cpuinfo
from agent.errors import AgentError

pytestmark = pytest.mark.timeout(90)
BASELINE = " ".join(COMPAT_FLAGS)


def nothing_on(b, shm_prefix):
    assert b.call("vm.list") == [] and b.call("jobs") == []
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"{shm_prefix}.B.")]


def test_another_cpu_vendor_is_refused_before_anything(agents, shm_prefix):
    a, b = agents("A"), agents("B", "--set", "host.cpu_vendor=OtherVendor")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=500")
    dry = a.call("migrate.check", vm="vm1", to=b.addr)
    assert dry["ok"] is False and "OtherVendor" in dry["reason"], dry
    with pytest.raises(AgentError, match="OtherVendor CPU"):
        a.call("migrate", vm="vm1", to=b.addr, check=True)
    r = a.call("migrate", vm="vm1", to=b.addr, wait=True, timeout_s=None)
    assert r["status"] == "failed" and "OtherVendor" in r["error"], r
    assert a.call("vm.show", name="vm1")["state"] == "running"
    nothing_on(b, shm_prefix)
    a.call("vm.delete", name="vm1")


def test_a_missing_flag_is_named_and_compat_mode_migrates(agents, shm_prefix):
    vendor, flags = read_cpuinfo()
    extra = sorted(set(flags) - set(COMPAT_FLAGS))
    if not extra or any(f not in flags for f in COMPAT_FLAGS):
        pytest.skip("this CPU has no flag beyond the x86-64-v2 baseline (or lacks the baseline)")
    a, b = agents("A"), agents("B", "--set", f"host.cpu_flags={BASELINE}")
    a.call("vm.create", name="hostcpu", memory="16M", cpu="host")
    r = a.call("migrate", vm="hostcpu", to=b.addr, wait=True, timeout_s=None)
    assert r["status"] == "failed" and "lacks flags" in r["error"] and extra[0] in r["error"], r
    nothing_on(b, shm_prefix)
    a.call("vm.create", name="compat", memory="16M", cpu="compat", workload="uniform:rate=500")
    r = a.call("migrate", vm="compat", to=b.addr, wait=True, timeout_s=None)
    assert r["status"] == "completed" and r["verified"] is True, r
    assert b.call("vm.show", name="compat")["cpu"] == {"mode": "compat", "vendor": vendor}
    b.call("vm.delete", name="compat")
    a.call("vm.delete", name="hostcpu")


def test_network_refusal_and_its_override(agents, shm_prefix):
    a = agents("A", "--set", "host.networks=prod,backup")
    b = agents("B", "--set", "host.networks=backup")
    a.call("vm.create", name="vm1", memory="16M", networks=["prod"])
    dry = a.call("migrate.check", vm="vm1", to=b.addr)
    assert dry["ok"] is False and "B is not connected to network 'prod'" in dry["reason"], dry
    r = a.call("migrate", vm="vm1", to=b.addr, wait=True, timeout_s=None)
    assert r["status"] == "failed" and "not connected to network 'prod'" in r["error"], r
    nothing_on(b, shm_prefix)
    r = a.call("migrate", vm="vm1", to=b.addr, wait=True, timeout_s=None, allow_network_change=True)
    assert r["status"] == "completed" and r["verified"] is True, r
    assert b.call("vm.show", name="vm1")["networks"] == ["prod"]     # it still wants prod: an operator decision
    b.call("vm.delete", name="vm1")


def test_error_code_matches_the_protocol():
    from agent.daemon.platform import INCOMPATIBLE
    from protocol import ErrorCode

    assert INCOMPATIBLE == ErrorCode.INCOMPATIBLE
