"""A third section (a few bytes of device state, tests/sections/device_section.py)
goes through the same driver as RAM: it migrates, it is verified before the
destination resumes, and a mismatch rolls back with the VM and its device state
on the source and nothing on the destination."""
from __future__ import annotations

import os

import pytest

from tests.conftest import wait_for
from tests.sections.device_section import device_path

pytestmark = pytest.mark.timeout(90)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def section_env(**extra) -> dict:
    path = os.environ.get("PYTHONPATH", "")
    return {"LIVEMIG_TEST_SECTIONS": "tests.sections.device_section",
            "PYTHONPATH": ROOT + (os.pathsep + path if path else ""), **extra}


def write_device(ag, vm: str, data: bytes) -> str:
    path = device_path(ag.data_dir, vm)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_device_section_migrates_and_is_verified(agents):
    a, b = agents("A", env=section_env()), agents("B", env=section_env())
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=2000")
    state = os.urandom(200)
    src = write_device(a, "vm1", state)
    report = a.call("migrate", vm="vm1", to=b.addr, wait=True, timeout_s=None)
    assert report["status"] == "completed" and report["verified"] is True, report
    assert not os.path.exists(src)                       # released with the source copy
    with open(device_path(b.data_dir, "vm1"), "rb") as f:
        assert f.read() == state                         # written on the destination at resume
    b.call("vm.delete", name="vm1")


def test_device_mismatch_rolls_back_through_the_same_driver(agents, shm_prefix):
    a = agents("A", env=section_env())
    b = agents("B", env=section_env(LIVEMIG_TEST_DEVICE_CORRUPT="1"))
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=2000")
    state = os.urandom(64)
    src = write_device(a, "vm1", state)
    report = a.call("migrate", vm="vm1", to=b.addr, wait=True, timeout_s=None)
    assert report["status"] == "failed" and report["verified"] is False, report
    assert "device" in report["error"] and "differ" in report["error"]
    info = a.call("vm.show", name="vm1")
    assert info["state"] == "running"
    wait_for(lambda: a.call("vm.show", name="vm1")["writes"] > info["writes"] + 100, 20, what="source runs")
    with open(src, "rb") as f:
        assert f.read() == state                         # the source keeps its state
    wait_for(lambda: b.call("vm.list") == [], 20, what="destination discarded")
    assert not os.path.exists(device_path(b.data_dir, "vm1"))
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"{shm_prefix}.B.")]
    a.call("vm.delete", name="vm1")
