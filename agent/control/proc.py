"""AgentProcess: run a real agent as a child process (demo, bench, tests).

Readiness is a fact, not a sleep: ``start()`` returns once the control
socket answers ``status`` (which also tells the bound migration port).

Agents run with mutual TLS unless told ``insecure=True``: each gets a host
certificate for its name from a ``ThrowawayCA`` (the one passed in, or one
made once in the work directory and shared by every agent started there),
so the demo, the bench and the tests need no credentials by hand.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from agent.control.server import ControlClient
from agent.errors import AgentError
from agent.net import tls

READY_POLL_S = 0.01


def wait_for(cond, timeout_s: float = 10.0, interval_s: float = 0.01, what: str = "condition",
             error: type[Exception] = AssertionError):
    """Poll ``cond()`` until it returns a truthy value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class ThrowawayCA:
    """A cluster CA in a directory (made with ``openssl`` on first use) and host
    certificates for agent names, each issued once (``credentials``)."""

    def __init__(self, directory: str) -> None:
        self.dir = os.path.abspath(directory)
        self.ca_dir = os.path.join(self.dir, "ca")
        if not os.path.exists(os.path.join(self.ca_dir, tls.CA_KEY)):
            tls.ca_init(self.ca_dir, name="livemig-throwaway-ca")
        self.ca_file = os.path.join(self.ca_dir, tls.CA_CERT)

    def credentials(self, name: str) -> dict[str, str]:
        """``{"ca_file", "cert_file", "key_file"}`` of agent ``name`` (issued on first call)."""
        out = os.path.join(self.dir, "hosts", name)
        files = {"ca_file": os.path.join(out, tls.CA_CERT), "cert_file": os.path.join(out, tls.HOST_CERT),
                 "key_file": os.path.join(out, tls.HOST_KEY)}
        if not all(os.path.exists(p) for p in files.values()):
            files = tls.issue_cert(name, self.ca_dir, out, force=True)
        return files

    def agent_args(self, name: str) -> tuple[str, ...]:
        """The ``livemig agent`` flags that make agent ``name`` use these credentials."""
        args: list[str] = ["--set", "security.mode=tls"]
        for key, path in self.credentials(name).items():
            args += ["--set", f"security.{key}={path}"]
        return tuple(args)

    def client_context(self, name: str):
        """An SSL context holding ``name``'s certificate, as an agent's connecting side has it
        (for tests that speak the wire protocol themselves)."""
        from types import SimpleNamespace
        return tls.client_context.__wrapped__(SimpleNamespace(**self.credentials(name)))


class AgentProcess:
    def __init__(self, name: str, workdir: str, *, shm_prefix: str, listen: str = "127.0.0.1:0",
                 extra_args: tuple[str, ...] = (), env: dict | None = None, insecure: bool = False,
                 ca: ThrowawayCA | None = None) -> None:
        self.name = name
        self.workdir = workdir
        self.shm_prefix = shm_prefix
        self.listen = listen
        self.extra_args = tuple(extra_args)
        self.env = env
        self.insecure = insecure
        self.ca = ca
        self.control = os.path.join(workdir, f"{name}.sock")
        self.data_dir = os.path.join(workdir, name)
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.proc: subprocess.Popen | None = None
        self.addr: str = ""

    def security_args(self) -> tuple[str, ...]:
        if self.insecure:
            return ("--set", "security.mode=insecure")
        if self.ca is None:                       # one CA per work directory, shared by its agents
            self.ca = ThrowawayCA(os.path.join(self.workdir, "tls"))
        return self.ca.agent_args(self.name)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "agent", "agent", "--name", self.name, "--listen", self.listen,
                "--control", self.control, "--data-dir", self.data_dir, "--shm-prefix", self.shm_prefix,
                "--log-format", "json", *self.security_args(), *self.extra_args]

    def start(self, timeout_s: float = 20.0) -> "AgentProcess":
        os.makedirs(self.workdir, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self.env)
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        client = ControlClient(self.control, timeout_s=2.0)
        while True:
            if self.proc.poll() is not None:
                raise AgentError(f"agent {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if os.path.exists(self.control):
                try:
                    st = client.call("status")
                    self.addr = st["listen"]
                    return self
                except AgentError:
                    pass
            if time.monotonic() > deadline:
                self.kill()
                raise AgentError(f"agent {self.name} not ready within {timeout_s} s:\n{self.log_tail()}")
            time.sleep(READY_POLL_S)

    def call(self, op: str, timeout_s: float | None = 60.0, **args):
        return ControlClient(self.control, timeout_s=timeout_s).call(op, **args)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM and wait (graceful); SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
