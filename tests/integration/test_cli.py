"""The CLI as an operator runs it (``python -m agent ...``) against real agents: exit codes and errors."""
from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import sys

import pytest

from agent.errors import AgentError
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(90)


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI with no agent at all (LIVEMIG_AGENT unset unless ``env`` sets it)."""
    base = {k: v for k, v in os.environ.items() if k != "LIVEMIG_AGENT"}
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=30,
                          env=dict(base, **(env or {})))


def _one_clear_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_completed_and_verified_migration_exits_0(agents):
    a, b = agents("A"), agents("B")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=2000")
    r = agents.cli(a, "migrate", "vm1", "--to", b.addr, "--wait", "--verify", "incremental", "--downtime-ms", "200")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "state         completed" in r.stdout and "verified      yes" in r.stdout
    assert b.call("vm.show", name="vm1")["state"] == "running"
    job = next(j for j in a.call("jobs") if j["vm"] == "vm1")
    r = agents.cli(a, "job", job["id"], "--wait", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["verified"] is True
    b.call("vm.delete", name="vm1")


def test_failed_migration_exits_1_with_its_report(agents):
    a = agents("A")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=1000")
    with socket.socket() as s:                 # bound, not listening: nothing answers there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        r = agents.cli(a, "migrate", "vm1", "--to", f"127.0.0.1:{port}", "--wait")
        assert r.returncode == 1
        assert "state         failed" in r.stdout and "Traceback" not in r.stderr
        job = next(j for j in a.call("jobs") if j["vm"] == "vm1")
        r = agents.cli(a, "job", job["id"], "--wait", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["status"] == "failed"
    assert a.call("vm.show", name="vm1")["state"] == "running"
    a.call("vm.delete", name="vm1")


def test_usage_errors_exit_2_in_one_line():
    for args, needle in ((["migrate", "vm1", "--to", "h:1", "--downtime-ms", "0"], "--downtime-ms: must be >= 1"),
                         (["migrate", "vm1", "--to", "h:1", "--max-bandwidth", "lots"], "--max-bandwidth"),
                         (["migrate", "vm1", "--to", "h:1", "--priority", "1.5"], "--priority"),
                         (["vm", "frobnicate", "vm1"], "invalid choice: 'frobnicate'"),
                         (["vm", "list"], "no agent given")):
        r = _run(*args)
        assert r.returncode == 2 and r.stdout == "", (args, r.stdout)
        assert needle in _one_clear_line(r), (args, r.stderr)
    r = _run("migrate", "vm1", "--to", "h:1", "--downtime-ms", "-1", "--json")
    assert r.returncode == 2 and r.stderr == ""
    assert json.loads(r.stdout)["code"] == 2


def test_no_agent_on_the_socket_exits_3(tmp_path):
    sock = str(tmp_path / "gone.sock")
    r = _run("--agent", sock, "vm", "list")
    assert r.returncode == 3 and r.stdout == ""
    assert f"cannot reach the agent at {sock}" in _one_clear_line(r)
    r = _run("vm", "list", "--json", env={"LIVEMIG_AGENT": sock})
    assert r.returncode == 3 and r.stderr == ""
    doc = json.loads(r.stdout)
    assert doc["code"] == 3 and sock in doc["error"]
    with socket.socket(socket.AF_UNIX) as s:     # a socket file nobody listens on (a dead agent's)
        s.bind(sock)
        r = _run("--agent", sock, "status")
    assert r.returncode == 3 and "cannot reach the agent" in r.stderr


def test_agent_errors_exit_1_as_json_or_one_line(agents):
    a = agents("A")
    r = agents.cli(a, "vm", "show", "nosuch", "--json")
    assert r.returncode == 1 and r.stderr == ""
    doc = json.loads(r.stdout)
    assert doc["code"] == 1 and "no VM named" in doc["error"]
    r = agents.cli(a, "vm", "delete", "nosuch")
    assert r.returncode == 1 and r.stdout == "" and "no VM named" in _one_clear_line(r)
    r = agents.cli(a, "job", "nojob", "--wait", "--json")
    assert r.returncode == 1 and "no job" in json.loads(r.stdout)["error"]
    r = agents.cli(a, "report", "nojob")
    assert r.returncode == 1 and "no job" in _one_clear_line(r)


def test_bad_data_dir_at_agent_start_is_one_line(tmp_path):
    afile = tmp_path / "plain-file"
    afile.write_text("")
    r = _run("agent", "--data-dir", str(afile / "data"), "--control", str(tmp_path / "c.sock"),
             "--listen", "127.0.0.1:0", "--set", "security.mode=insecure")
    assert r.returncode == 1
    assert "data directory" in _one_clear_line(r) and "Not a directory" in r.stderr
    assert not (tmp_path / "c.sock").exists()


def test_version_is_the_installed_package_version():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"livemig {importlib.metadata.version('livemig')}"


def _knows(ag, op: str) -> bool:
    """Whether the agent has a handler for ``op`` (an unknown op is answered 'unknown request ...')."""
    try:
        ag.call(op, name="no-such-vm")
    except AgentError as exc:
        return not str(exc).startswith("unknown request")
    return True


def _writes(ag, name: str) -> int:
    return ag.call("vm.show", name=name)["writes"]


def test_vm_pause_resume_start(agents):
    a = agents("A")
    if not all(_knows(a, op) for op in ("vm.pause", "vm.resume", "vm.start")):
        pytest.skip("the agent has no vm.pause / vm.resume / vm.start yet")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=2000")
    r = agents.cli(a, "vm", "pause", "vm1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "paused"
    assert a.call("vm.show", name="vm1")["state"] == "paused"
    r = agents.cli(a, "vm", "resume", "vm1")
    assert r.returncode == 0 and r.stdout.strip() == "vm1: running", r.stdout + r.stderr
    before = _writes(a, "vm1")
    wait_for(lambda: _writes(a, "vm1") > before + 100, 20, what="writes grow after resume")
    r = agents.cli(a, "vm", "pause", "vm1")
    assert r.returncode == 0 and r.stdout.strip() == "vm1: paused", r.stdout + r.stderr
    r = agents.cli(a, "vm", "resume", "vm1", "--force", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "running", r.stdout + r.stderr
    r = agents.cli(a, "vm", "start", "vm1")                   # its guest runs: nothing to start
    assert r.returncode == 1 and "runs already" in _one_clear_line(r)
    for cmd in ("pause", "resume", "start"):
        r = agents.cli(a, "vm", cmd, "nosuch")
        assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("livemig: "), r.stderr
    a.call("vm.delete", name="vm1")
