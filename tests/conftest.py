"""Shared fixtures: a unique shm prefix per test, real agent processes, and a leak check.

Every test gets its own ``shm_prefix``; agents started through
the ``agents`` fixture use it for their segments, and guests carry their
segment name on their command line. After the test, the ``shm_prefix``
fixture stops the agents, then fails the test if any /dev/shm segment or
process with that prefix is left (and removes them, so one leak does not
cascade into other tests).
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys

import psutil
import pytest

from agent.control.proc import AgentProcess, wait_for  # noqa: F401 - wait_for is re-exported for the tests

SHM_DIR = "/dev/shm"


def leftovers(prefix: str) -> tuple[list[str], list[psutil.Process]]:
    segs = [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    procs = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != me and any(prefix in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return segs, procs




class Agents:
    def __init__(self, tmp_path, prefix: str) -> None:
        self.tmp = str(tmp_path)
        self.prefix = prefix
        self.started: list[AgentProcess] = []

    def __call__(self, name: str, *extra: str, listen: str = "127.0.0.1:0", start: bool = True,
                 env: dict | None = None) -> AgentProcess:
        """Start an agent; ``env`` adds environment variables (e.g. a fault-injection hook)."""
        ag = AgentProcess(name, self.tmp, shm_prefix=self.prefix, listen=listen, extra_args=extra,
                          env=dict(os.environ, **env) if env else None)
        self.started.append(ag)
        return ag.start() if start else ag

    def restart(self, ag: AgentProcess, listen: str | None = None) -> AgentProcess:
        ag.kill()
        if listen is not None:
            ag.listen = listen
        return ag.start()

    def cli(self, ag: AgentProcess, *args: str, timeout_s: float = 90.0) -> subprocess.CompletedProcess:
        env = dict(os.environ, LIVEMIG_AGENT=ag.control)
        return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                              timeout=timeout_s, env=env)

    def stop_all(self) -> None:
        for ag in self.started:
            ag.stop(timeout_s=20.0)


@pytest.fixture
def shm_prefix():
    prefix = f"livemig-t{secrets.token_hex(4)}"
    yield prefix
    segs, procs = leftovers(prefix)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)
    for s in segs:
        try:
            os.unlink(os.path.join(SHM_DIR, s))
        except FileNotFoundError:
            pass
    assert not segs and not procs, (
        f"leaked: segments {segs}, processes {[(p.pid, ' '.join(p.info['cmdline'] or [])[:120]) for p in procs]}")


@pytest.fixture
def agents(tmp_path, shm_prefix):
    a = Agents(tmp_path, shm_prefix)
    try:
        yield a
    finally:
        a.stop_all()
