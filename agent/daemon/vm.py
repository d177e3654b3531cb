"""One VM as this agent holds it: spec, guest RAM segment, guest process.

The guest ("vCPU") is a separate process in its own session, attached to
the VM's segment (see ``memstore.guest``). The agent talks to it only
through the shared control block: ``command(PAUSE|RUN|STOP)`` and waits
for the matching acknowledgement.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field

import psutil

from memstore import Cmd, GuestRam, GuestState, SegmentError, is_guest_process, launch_guest, parse_workload

from agent.errors import VmError
from agent.migration.heat import ChunkHeat

ACK_POLL_S = 0.001


@dataclass
class VmRecord:
    """What survives an agent restart (``<data_dir>/vms/<name>.json``)."""

    name: str
    id: str
    memory_bytes: int
    workload: str
    segment: str
    state: str = "running"            # running | paused | incoming | broken
    guest_pid: int = 0
    migration_id: str = ""            # last inbound migration that brought it here
    created_at: float = field(default_factory=time.time)
    # The outbound migration that owns the VM, saved before the pause so that a
    # restarted agent can ask the destination how it ended:
    # {"id": job id, "peer": "HOST:PORT", "phase": phase value} or None.
    outbound: dict | None = None
    guest_restarts: int = 0
    broken_reason: str = ""


class Vm:
    def __init__(self, record: VmRecord, ram: GuestRam, proc: subprocess.Popen | None = None) -> None:
        self.record = record
        self.ram = ram
        self.proc = proc
        self.migrating: str | None = None      # job id while a migration owns the VM
        self.heat = ChunkHeat(ram.npages)      # write frequency, for a cold-first full pass

    # ---- construction ------------------------------------------------------
    @classmethod
    def new_id(cls) -> str:
        return secrets.token_hex(4)

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def ctl(self):
        return self.ram.ctl

    # ---- guest control -----------------------------------------------------
    def start_guest(self, log_path: str | None = None) -> None:
        self.proc = launch_guest(self.record.segment, log_path=log_path)
        self.record.guest_pid = self.proc.pid

    def guest_alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        pid = self.record.guest_pid
        return bool(pid) and is_guest_process(pid, self.record.segment)

    async def command(self, cmd: Cmd, timeout_s: float) -> None:
        """Issue a command and wait until the guest acknowledges it."""
        await self.wait_ack(self.ctl.command(cmd), timeout_s, what=cmd.name.lower())

    async def wait_ack(self, seq: int, timeout_s: float, what: str = "a command") -> None:
        """Wait until the guest acknowledged command number ``seq``."""
        deadline = time.monotonic() + timeout_s
        while not self.ctl.acknowledged(seq):
            if not self.guest_alive():
                raise VmError(f"guest of {self.name} is not running (asked to {what})")
            if time.monotonic() > deadline:
                raise VmError(f"guest of {self.name} did not acknowledge {what} within {timeout_s} s")
            await asyncio.sleep(ACK_POLL_S)

    async def pause(self, timeout_s: float) -> None:
        await self.command(Cmd.PAUSE, timeout_s)

    async def resume(self, timeout_s: float) -> None:
        await self.command(Cmd.RUN, timeout_s)

    async def wait_running(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.ctl.guest_state != GuestState.RUNNING:
            if not self.guest_alive():
                raise VmError(f"guest of {self.name} exited during start")
            if time.monotonic() > deadline:
                raise VmError(f"guest of {self.name} did not start within {timeout_s} s")
            await asyncio.sleep(ACK_POLL_S)

    async def stop_guest(self, timeout_s: float) -> None:
        """Stop the guest process (STOP, then SIGKILL if it does not obey) and reap it."""
        if self.proc is None and not self.record.guest_pid:
            return
        if self.guest_alive():
            try:
                await self.command(Cmd.STOP, timeout_s)
            except VmError:
                pass
        await self._reap(timeout_s)
        self.proc = None
        self.record.guest_pid = 0

    async def _reap(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        if self.proc is not None:
            while self.proc.poll() is None:
                if time.monotonic() > deadline:
                    self.proc.kill()
                    deadline = time.monotonic() + timeout_s
                await asyncio.sleep(ACK_POLL_S)
            return
        pid = self.record.guest_pid
        if not pid or not is_guest_process(pid, self.record.segment):
            return
        try:
            p = psutil.Process(pid)
            while p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                if time.monotonic() > deadline:
                    p.send_signal(signal.SIGKILL)
                    deadline = time.monotonic() + timeout_s
                await asyncio.sleep(ACK_POLL_S)
        except psutil.NoSuchProcess:
            pass

    def release(self) -> None:
        """Close and remove the segment (the guest must be stopped). The file is
        unlinked even if a stray view still pins the mapping (then the memory
        goes when the view does)."""
        try:
            self.ram.close()
        except SegmentError:
            pass
        finally:
            self.ram.unlink()

    # ---- reporting ---------------------------------------------------------
    def state(self) -> str:
        if self.migrating is not None or self.record.state == "incoming":
            return "migrating"
        if not self.guest_alive():
            return "stopped"
        gs = self.ctl.guest_state
        if gs == GuestState.PAUSED:
            return "paused"
        if gs == GuestState.RUNNING:
            return "running"
        return "stopped"

    def info(self) -> dict:
        r = self.record
        ctl = self.ctl
        return {
            "name": r.name,
            "id": r.id,
            "state": self.state(),
            "memory_bytes": r.memory_bytes,
            "workload": r.workload,
            "writes": int(ctl.writes),
            "write_rate_pps": int(ctl.rate_pps),
            "throttle_pct": int(ctl.throttle_pct),
            "guest_pid": r.guest_pid,
            "segment": r.segment,
            "migration": self.migrating,
            "created_at": r.created_at,
        }


def check_workload(spec: str, memory_bytes: int):
    from memstore import WorkloadError, validate_for

    try:
        w = parse_workload(spec)
        validate_for(w, memory_bytes)
    except WorkloadError as exc:
        raise VmError(str(exc)) from exc
    return w
