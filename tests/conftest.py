"""Shared fixtures: a unique shm prefix per test, real agent processes, and a leak check.

Every agent the ``agents`` fixture starts runs with mutual TLS, with a host
certificate for its name from one throwaway CA per test session
(``cluster_ca``, made with ``openssl`` in a pytest tmp dir); pass
``insecure=True`` for an agent without TLS. Tests that speak the wire
protocol themselves wrap their socket with ``agents.tls_connect(addr)``
(a valid certificate, for a name of their choosing) or use an insecure agent.

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
import socket
import ssl
import subprocess
import sys

import psutil
import pytest

from agent.control.proc import AgentProcess, ThrowawayCA, wait_for  # noqa: F401 - wait_for is re-exported

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
    def __init__(self, tmp_path, prefix: str, ca: ThrowawayCA) -> None:
        self.tmp = str(tmp_path)
        self.prefix = prefix
        self.ca = ca
        self.started: list[AgentProcess] = []

    def __call__(self, name: str, *extra: str, listen: str = "127.0.0.1:0", start: bool = True,
                 env: dict | None = None, insecure: bool = False, ca: ThrowawayCA | None = None) -> AgentProcess:
        """Start an agent (TLS with the session CA, or ``ca``; ``insecure=True``: no TLS);
        ``env`` adds environment variables (e.g. a fault-injection hook)."""
        ag = AgentProcess(name, self.tmp, shm_prefix=self.prefix, listen=listen, extra_args=extra,
                          env=dict(os.environ, **env) if env else None, insecure=insecure, ca=ca or self.ca)
        self.started.append(ag)
        return ag.start() if start else ag

    def tls_connect(self, addr: str, name: str = "test-peer", timeout_s: float = 10.0) -> ssl.SSLSocket:
        """A TCP connection to ``addr`` with mutual TLS done, holding a valid certificate for ``name``."""
        host, port = addr.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=timeout_s)
        try:
            return self.ca.client_context(name).wrap_socket(raw, server_hostname=None)
        except BaseException:
            raw.close()
            raise

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


@pytest.fixture(scope="session")
def cluster_ca(tmp_path_factory) -> ThrowawayCA:
    """One throwaway cluster CA for the whole session (host certificates are issued per name, once)."""
    return ThrowawayCA(str(tmp_path_factory.mktemp("cluster-ca")))


@pytest.fixture
def agents(tmp_path, shm_prefix, cluster_ca):
    a = Agents(tmp_path, shm_prefix, cluster_ca)
    try:
        yield a
    finally:
        a.stop_all()


class PlainAgents:
    """``agents`` whose agents run without TLS (``insecure=True``) unless a test says
    otherwise: for tests that speak the wire protocol on a plain socket themselves
    (TLS peers, and what they can and cannot do, are tested in test_trust.py/test_tls.py)."""

    def __init__(self, inner: Agents) -> None:
        self._inner = inner

    def __call__(self, *args, **kw) -> AgentProcess:
        kw.setdefault("insecure", True)
        return self._inner(*args, **kw)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.fixture
def plain_agents(agents):
    return PlainAgents(agents)
