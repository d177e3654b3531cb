"""``livemig agent`` start-up errors: one line naming the flag and key, with the likely cause."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def _agent(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LIVEMIG_AGENT"}
    return subprocess.run([sys.executable, "-m", "agent", "agent", "--name", "x", "--data-dir", str(tmp_path / "d"),
                           "--set", "security.mode=insecure", *args], capture_output=True, text=True, timeout=30,
                          env=env)


def test_listen_address_in_use_or_foreign_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _agent(tmp_path, "--listen", f"127.0.0.1:{port}", "--control", str(tmp_path / "c.sock"))
        assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
        assert "agent.listen (--listen)" in r.stderr and "address in use: is another agent running?" in r.stderr
        r = _agent(tmp_path, "--listen", f"127.0.0.1:{port}", "--control", str(tmp_path / "c.sock"), "--json")
    assert r.returncode == 2                          # --json is no option of 'agent': a usage error, as JSON
    assert json.loads(r.stdout)["code"] == 2
    r = _agent(tmp_path, "--listen", "192.0.2.1:7700", "--control", str(tmp_path / "c.sock"))
    assert r.returncode == 1 and "no interface of this host has that address" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "c.sock").exists()


def test_a_second_agent_on_the_same_control_socket_is_one_line(agents, tmp_path):
    a = agents("A")
    r = _agent(tmp_path, "--listen", "127.0.0.1:0", "--control", a.control)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "agent.control (--control)" in r.stderr and "is another agent running?" in r.stderr
    assert a.call("status")["agent"] == "A"           # the running one is untouched
