"""One agent per data dir, per identity (shm prefix + name) and per control socket.

A second agent that would share any of them refuses with one line naming
what is taken and by which pid, exits non-zero, and touches nothing: no
segment unlinked, no record changed, the first agent's socket still answers.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from agent.control.proc import AgentProcess
from agent.control.server import ControlClient
from agent.daemon.config import load_config
from agent.daemon.host import InstanceLock
from agent.errors import AgentError
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(90)


def _snapshot(data_dir: str) -> dict[str, bytes]:
    """Every file of a data dir except the guest logs (the guests write them)."""
    out = {}
    for root, _, files in os.walk(data_dir):
        for fn in files:
            path = os.path.join(root, fn)
            if os.path.basename(root) != "guests":
                with open(path, "rb") as f:
                    out[os.path.relpath(path, data_dir)] = f.read()
    return out


def _run_second(ag: AgentProcess) -> subprocess.CompletedProcess:
    return subprocess.run(ag.command(), capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def _refusal(r: subprocess.CompletedProcess) -> str:
    """The one line a refused agent prints: the daemon's log line, or the CLI's own check before it."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1, (r.returncode, r.stderr)
    try:
        return json.loads(lines[0])["error"]
    except ValueError:
        return lines[0]


def _lock_as(tmp_path, shm_prefix: str, name: str, data_dir: str, control: str) -> InstanceLock:
    """The daemon's own claims, taken in this process (behind the CLI's pre-checks)."""
    cfg = load_config(None, {"agent.name": name, "agent.data_dir": data_dir, "agent.control": control,
                             "agent.shm_prefix": shm_prefix, "security.mode": "insecure"})
    os.makedirs(data_dir, exist_ok=True)
    return InstanceLock(cfg).acquire()


@pytest.fixture
def first(agents, shm_prefix):
    a = agents("A")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=2000")
    info = a.call("vm.show", name="vm1")
    yield a, info
    a.call("vm.delete", name="vm1")


def _first_unharmed(a: AgentProcess, info: dict, before: dict[str, bytes], sock_ino: int) -> None:
    assert os.path.exists(f"/dev/shm/{info['segment']}")
    assert os.stat(a.control).st_ino == sock_ino                  # not unlinked and re-made
    assert _snapshot(a.data_dir) == before
    now = a.call("vm.show", name="vm1")
    assert now["guest_pid"] == info["guest_pid"] and now["state"] == "running"
    wait_for(lambda: a.call("vm.show", name="vm1")["writes"] > now["writes"] + 200, 20, what="writes go on")


def test_same_name_other_data_dir_is_refused(first, tmp_path, shm_prefix):
    a, info = first
    before, ino = _snapshot(a.data_dir), os.stat(a.control).st_ino
    # Same agent name and shm prefix, its own data dir and control socket:
    # it would sweep A's segments as its orphans.
    twin = AgentProcess("A", str(tmp_path / "elsewhere"), shm_prefix=shm_prefix, ca=a.ca)
    msg = _refusal(_run_second(twin))
    assert msg.startswith("another agent already runs as A with shm prefix") and f"pid {a.proc.pid}" in msg
    assert not os.path.exists(twin.control)
    _first_unharmed(a, info, before, ino)


def test_same_data_dir_is_refused(first, tmp_path, shm_prefix):
    a, info = first
    before, ino = _snapshot(a.data_dir), os.stat(a.control).st_ino
    other = AgentProcess("B", str(tmp_path), shm_prefix=shm_prefix, extra_args=("--data-dir", a.data_dir), ca=a.ca)
    msg = _refusal(_run_second(other))
    assert msg == f"another agent already uses data dir {a.data_dir} (pid {a.proc.pid})"
    _first_unharmed(a, info, before, ino)


def test_same_control_socket_is_refused(first, tmp_path, shm_prefix):
    a, info = first
    before, ino = _snapshot(a.data_dir), os.stat(a.control).st_ino
    other = AgentProcess("C", str(tmp_path / "c"), shm_prefix=shm_prefix, extra_args=("--control", a.control),
                         ca=a.ca)
    msg = _refusal(_run_second(other))
    assert a.control in msg and "another agent" in msg
    with pytest.raises(AgentError) as exc:                 # the daemon's claim, whatever the CLI checks first
        _lock_as(tmp_path, shm_prefix, "C", str(tmp_path / "c" / "C"), a.control)
    assert str(exc.value) == f"another agent already uses control socket {a.control} (pid {a.proc.pid})"
    _first_unharmed(a, info, before, ino)
    assert ControlClient(a.control, timeout_s=5).call("ping")["pid"] == a.proc.pid


def test_a_live_socket_without_lock_is_never_unlinked(agents, tmp_path, shm_prefix):
    """Whatever answers on the control path (not an agent, or one without these locks) is left alone."""
    path = str(tmp_path / "busy.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen(4)
        ino = os.stat(path).st_ino
        ag = AgentProcess("D", str(tmp_path), shm_prefix=shm_prefix, extra_args=("--control", path), ca=agents.ca)
        assert path in _refusal(_run_second(ag))
        with pytest.raises(AgentError) as exc:
            _lock_as(tmp_path, shm_prefix, "D", ag.data_dir, path)
        assert str(exc.value) == f"another agent already uses control socket {path} (pid {os.getpid()})"
        assert os.stat(path).st_ino == ino
        assert not os.path.exists(path + ".lock")         # a refused claim leaves no lock file behind


def test_claims_in_process_name_what_is_taken(first, tmp_path, shm_prefix):
    """Each claim on its own, and a refused acquire releases what it had taken."""
    a, _ = first
    with pytest.raises(AgentError, match=f"already runs as A with shm prefix {shm_prefix} \\(pid {a.proc.pid}\\)"):
        _lock_as(tmp_path, shm_prefix, "A", str(tmp_path / "x"), str(tmp_path / "x.sock"))
    with pytest.raises(AgentError, match=f"already uses data dir {a.data_dir} \\(pid {a.proc.pid}\\)"):
        _lock_as(tmp_path, shm_prefix, "E", a.data_dir, str(tmp_path / "e.sock"))
    # The refused attempts hold nothing: the same claims (other than A's) can be taken at once.
    lock = _lock_as(tmp_path, shm_prefix, "E", str(tmp_path / "x"), str(tmp_path / "x.sock"))
    lock.release()
    assert not os.path.exists(str(tmp_path / "x.sock.lock"))


def test_locks_are_released_at_exit(agents, tmp_path):
    """A stopped (or killed) agent leaves no claim: the next one starts at once, and leaves no lock file
    next to its control socket."""
    a = agents("A")
    assert a.stop() == 0
    assert not os.path.exists(a.control) and not os.path.exists(a.control + ".lock")
    a.start()
    a.kill()                                  # SIGKILL: the kernel drops the flocks and the abstract name
    a.start()
    assert a.call("ping")["pid"] == a.proc.pid
