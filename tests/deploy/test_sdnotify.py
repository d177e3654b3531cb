"""agent.sdnotify against a real AF_UNIX datagram socket bound by the test (the role systemd plays).

The last test runs a real agent under a fake ``$NOTIFY_SOCKET``; it is

"""
from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from agent.observe import sdnotify


@pytest.fixture
def notify_sock(monkeypatch):
    """A bound datagram socket; $NOTIFY_SOCKET points at it. Yields (socket, address string)."""
    d = tempfile.mkdtemp(prefix="lmnotify-", dir="/tmp")       # short: sun_path is 108 bytes
    path = os.path.join(d, "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5.0)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        yield s, path
    finally:
        s.close()
        shutil.rmtree(d, ignore_errors=True)


def test_unset_is_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False
    assert sdnotify.stopping() is False
    assert sdnotify.watchdog() is False
    assert sdnotify.status("x") is False


@pytest.mark.parametrize("value", ["", "relative/path.sock", "vsock:2:1234"])
def test_unusable_address_is_false(monkeypatch, value):
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_nobody_listening_is_false_not_an_exception(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.ready() is False


def test_path_socket_messages(notify_sock):
    s, _ = notify_sock
    assert sdnotify.notify("READY=1") is True
    assert s.recv(4096) == b"READY=1"
    assert sdnotify.ready() is True
    assert s.recv(4096) == b"READY=1"
    assert sdnotify.stopping() is True
    assert s.recv(4096) == b"STOPPING=1"
    assert sdnotify.watchdog() is True
    assert s.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.status("2 VMs,\n1 migration") is True
    assert s.recv(4096) == b"STATUS=2 VMs, 1 migration"      # one line
    assert sdnotify.notify("READY=1\nSTATUS=up") is True
    assert s.recv(4096) == b"READY=1\nSTATUS=up"


def test_abstract_socket(monkeypatch):
    name = f"livemig-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready() is True
        assert s.recv(4096) == b"READY=1"
        assert sdnotify.stopping() is True
        assert s.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("usec,pid,expected", [
    (None, None, None),
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "1", None),             # meant for another process
    ("0", None, None),
    ("abc", None, None),
    ("-5", None, None),
    ("30000000", "x", None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    for k, v in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)):
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    assert sdnotify.watchdog_interval_s() == expected


def test_watchdog_loop_pings_until_cancelled(notify_sock):
    s, _ = notify_sock
    s.setblocking(False)

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(sdnotify.watchdog_loop(0.01))
        try:
            async with asyncio.timeout(5):
                got = [await loop.sock_recv(s, 4096) for _ in range(3)]
        finally:
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return got

    assert asyncio.run(main()) == [b"WATCHDOG=1"] * 3


def test_watchdog_loop_rejects_bad_interval():
    with pytest.raises(ValueError):
        asyncio.run(sdnotify.watchdog_loop(0))


# ---- the agent under a fake $NOTIFY_SOCKET ------------------------------------------
def _recv_until(s: socket.socket, want: bytes, proc: subprocess.Popen, timeout_s: float) -> list[bytes]:
    """Datagrams until one contains ``want`` as a line; fails if the agent exits first."""
    got = []
    deadline = time.monotonic() + timeout_s
    while True:
        s.settimeout(0.05)
        try:
            msg = s.recv(4096)
            got.append(msg)
            if want in msg.split(b"\n"):
                return got
        except TimeoutError:
            pass
        if proc.poll() is not None and not got:
            raise AssertionError(f"agent exited with {proc.returncode} before sending {want!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {want!r} within {timeout_s} s; got {got}")


@pytest.mark.timeout(120)
def test_agent_ready_watchdog_stopping_and_vms_survive(notify_sock, tmp_path, shm_prefix, cluster_ca):
    from agent.control.server import ControlClient
    from agent.errors import AgentError

    s, path = notify_sock
    ctl = str(tmp_path / "a.sock")
    cmd = [sys.executable, "-m", "agent", "agent", "--name", "A", "--listen", "127.0.0.1:0", "--control", ctl,
           "--data-dir", str(tmp_path / "A"), "--shm-prefix", shm_prefix, "--log-format", "json",
           *cluster_ca.agent_args("A")]                                   # TLS, as every agent by default
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")   # ping every 0.1 s
    env.pop("WATCHDOG_PID", None)
    log = open(tmp_path / "a.log", "ab")

    def start() -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        _recv_until(s, b"READY=1", p, 30)
        # READY=1 means "accepting": both endpoints answer at once, no retry.
        st = ControlClient(ctl, timeout_s=5).call("status")
        host, port = st["listen"].rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()
        return p

    proc = start()
    try:
        _recv_until(s, b"WATCHDOG=1", proc, 10)
        vm = ControlClient(ctl, timeout_s=60).call("vm.create", name="vm1", memory="16M", workload="idle")
        seg = vm.get("segment") or next(n for n in os.listdir("/dev/shm") if n.startswith(f"{shm_prefix}.A.vm1."))

        proc.send_signal(signal.SIGTERM)
        _recv_until(s, b"STOPPING=1", proc, 20)
        assert proc.wait(30) == 0
        # as documented: guests outlive the agent (KillMode=process) ...
        assert os.path.exists(f"/dev/shm/{seg}")
        assert psutil.pid_exists(vm["guest_pid"])
        with pytest.raises(AgentError):
            ControlClient(ctl, timeout_s=2).call("status")

        # ... and the next start re-adopts them.
        proc = start()
        vms = ControlClient(ctl, timeout_s=10).call("vm.list")
        assert [(v["name"], v["state"]) for v in vms] == [("vm1", "running")]
        ControlClient(ctl, timeout_s=30).call("vm.delete", name="vm1")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()
