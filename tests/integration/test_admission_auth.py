"""Admission (memory), authentication, and failed migrations as a user sees them."""
from __future__ import annotations

import json
import os
import socket

import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(90)


def test_destination_refuses_vm_it_has_no_memory_for(agents, shm_prefix):
    a = agents("A")
    b = agents("B", "--set", "limits.max_guest_memory_mib=128")
    a.call("vm.create", name="big", memory="256M", workload="uniform:rate=1000")
    r = agents.cli(a, "migrate", "big", "--to", b.addr, "--wait", "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 1
    assert report["status"] == "failed"
    assert "needs 256 MiB" in report["error"] and "available" in report["error"], report["error"]
    assert a.call("vm.show", name="big")["state"] == "running"
    assert b.call("vm.list") == [] and b.call("jobs") == []      # a refusal leaves no inbound job
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"{shm_prefix}.B.")]
    a.call("vm.delete", name="big")


def test_unreachable_destination_fails_cleanly(agents):
    a = agents("A")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=1000")
    with socket.socket() as s:                 # a port that is bound but not listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        r = agents.cli(a, "migrate", "vm1", "--to", f"127.0.0.1:{port}", "--wait", "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 1 and report["status"] == "failed"
    assert "cannot connect" in report["error"]
    assert a.call("vm.show", name="vm1")["state"] == "running"
    a.call("vm.delete", name="vm1")


def _key(tmp_path, name: str, value: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(value)
    return str(p)


def test_shared_key_authenticates_and_wrong_key_is_refused(agents, tmp_path):
    k1 = _key(tmp_path, "k1", b"0123456789abcdef-one")
    k2 = _key(tmp_path, "k2", b"0123456789abcdef-two")
    a = agents("A", "--set", f"migration.auth_key_file={k1}")
    b = agents("B", "--set", f"migration.auth_key_file={k1}")
    c = agents("C", "--set", f"migration.auth_key_file={k2}")
    d = agents("D")                                           # no key at all
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=1000")

    for target in (c, d):
        report = a.call("migrate", vm="vm1", to=target.addr, wait=True, timeout_s=None)
        assert report["status"] == "failed", report
        assert "auth" in report["error"].lower(), report["error"]
        assert a.call("vm.show", name="vm1")["state"] == "running"
        assert target.call("vm.list") == []

    report = a.call("migrate", vm="vm1", to=b.addr, wait=True, timeout_s=None)
    assert report["status"] == "completed" and report["verified"], report
    b.call("vm.delete", name="vm1")


def test_control_socket_is_private_and_env_var_works(agents):
    a = agents("A")
    assert os.stat(a.control).st_mode & 0o777 == 0o600
    r = agents.cli(a, "vm", "list", "--json")          # LIVEMIG_AGENT set by agents.cli
    assert r.returncode == 0 and json.loads(r.stdout) == []
    r = agents.cli(a, "--agent", "/nonexistent.sock", "vm", "list")
    assert r.returncode == 3 and "cannot reach the agent" in r.stderr


def test_bad_config_is_a_clear_startup_error(tmp_path, shm_prefix):
    import subprocess
    import sys

    cfg = tmp_path / "bad.toml"
    cfg.write_text("[migration]\nmax_round = 3\n")
    r = subprocess.run([sys.executable, "-m", "agent", "agent", "--config", str(cfg), "--control",
                        str(tmp_path / "x.sock"), "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "did you mean migration.max_rounds" in r.stderr


def test_digest_mismatch_rolls_back_to_source(agents, shm_prefix):
    """The destination resumes before verification ends; a mismatch stops it and resumes the source."""
    a, b = agents("A"), agents("B", env={"LIVEMIG_FAULT_INJECT": "corrupt-page"})
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=2000", prefill="random")
    report = a.call("migrate", vm="vm1", to=b.addr, wait=True, timeout_s=None)
    assert report["status"] == "failed" and report["verified"] is False, report
    assert "differ" in report["error"]
    info = a.call("vm.show", name="vm1")
    assert info["state"] == "running"
    wait_for(lambda: a.call("vm.show", name="vm1")["writes"] > info["writes"] + 100, 20, what="source runs")
    wait_for(lambda: b.call("vm.list") == [], 20, what="destination discarded its copy")
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"{shm_prefix}.B.")]
    a.call("vm.delete", name="vm1")


def test_lost_resumed_is_resolved_by_query_never_two_copies(agents, shm_prefix):
    """Resume sent, the destination resumed, Resumed lost: the source asks, learns the VM runs
    there, and releases its copy without resuming it (one running copy at every moment)."""
    a, b = agents("A"), agents("B", env={"LIVEMIG_FAULT_INJECT": "lose-resumed"})
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=2000", prefill="random")
    report = a.call("migrate", vm="vm1", to=b.addr, wait=True, timeout_s=None)
    assert report["status"] == "completed", report
    # Verified before Resume was sent (v2): the copy that runs on B was proven equal.
    assert report["verified"] is True and report["verify_mode"] == "incremental"
    assert a.call("vm.list") == []
    info = b.call("vm.show", name="vm1")
    assert info["state"] in ("running", "migrating")
    wait_for(lambda: b.call("vm.show", name="vm1")["state"] == "running", 30, what="B's job ends")
    wait_for(lambda: b.call("vm.show", name="vm1")["writes"] > info["writes"] + 200, 20, what="B runs it")
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"{shm_prefix}.A.")]
    b.call("vm.delete", name="vm1")
