"""AgentProcess: run a real agent as a child process (demo, bench, tests).

Readiness is a fact, not a sleep: ``start()`` returns once the control
socket answers ``status`` (which also tells the bound migration port).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from agent.control.server import ControlClient
from agent.errors import AgentError

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


class AgentProcess:
    def __init__(self, name: str, workdir: str, *, shm_prefix: str, listen: str = "127.0.0.1:0",
                 extra_args: tuple[str, ...] = (), env: dict | None = None) -> None:
        self.name = name
        self.workdir = workdir
        self.shm_prefix = shm_prefix
        self.listen = listen
        self.extra_args = tuple(extra_args)
        self.env = env
        self.control = os.path.join(workdir, f"{name}.sock")
        self.data_dir = os.path.join(workdir, name)
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.proc: subprocess.Popen | None = None
        self.addr: str = ""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "agent", "agent", "--name", self.name, "--listen", self.listen,
                "--control", self.control, "--data-dir", self.data_dir, "--shm-prefix", self.shm_prefix,
                "--log-format", "json", *self.extra_args]

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
