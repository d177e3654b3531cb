"""One VM as this agent holds it: spec, guest RAM segment, guest process.

The guest ("vCPU") is a separate process in its own session, attached to
the VM's segment (see ``memstore.guest``). The agent talks to it only
through the shared control block: ``command(PAUSE|RUN|STOP)`` and waits
for the matching acknowledgement.

Supervision contract (``agent.daemon.agent.Supervisor``): ``guest_wanted``
says whether a guest process should exist (``stop_guest`` clears it,
``start_guest`` sets it); a wanted guest that died or whose heartbeat
stopped is either reported to the callbacks in ``on_guest_lost`` (a
migration driver that owns the VM registers ``cb(vm, reason)`` and removes
it when done; it restarts the guest itself with ``restart_guest``) or, when
nobody is registered, restarted from the segment's memory and vCPU state.

A ``broken`` VM has a record but no segment that attaches (``ram`` is
None): it is listed with ``broken_reason`` and never unlinked by the agent.

Disks: ``record.disks`` lists the VM's disk images in index order
(``{"name", "path", "size_bytes", "attached"}``); disk i's dirty-block map is
the shm file ``<segment>.d<i>`` (memstore.disk), which goes with the segment
(``release``). The record's path is the durable truth of which file is the
disk: a storage move saves the new path before it deletes the old file.
``attached`` images were brought by the operator (``--attach``) and are
never deleted with the VM.
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

from memstore import (Cmd, GuestRam, GuestState, SegmentError, is_guest_process, launch_guest, pages_for,
                      parse_workload, unlink_disk_maps, unlink_segment)

from agent.errors import VmError
from agent.migration.heat import ChunkHeat

ACK_POLL_S = 0.001
STOP_REMAINS_S = 1.0       # restart_guest: how long a leftover guest gets to obey STOP before SIGKILL


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
    # The VM's disks, in index order: {"name", "path", "size_bytes", "attached"}.
    disks: list = field(default_factory=list)
    cpu: dict | None = None           # {"mode": host|compat, "vendor", "flags"} (platform.py); None = any
    networks: list = field(default_factory=list)


class Vm:
    def __init__(self, record: VmRecord, ram: GuestRam | None, proc: subprocess.Popen | None = None) -> None:
        self.record = record
        self.ram = ram                         # None: broken (record kept, segment does not attach)
        self.proc = proc
        self.migrating: str | None = None      # job id while a migration owns the VM
        self.storage_move: str | None = None   # job id while a storage move owns it (migrating is set too)
        self.heat = ChunkHeat(ram.npages if ram is not None else pages_for(record.memory_bytes))
        self.hold_reason: str = ""             # why a paused VM waits (set by outbound recovery)
        self.on_guest_lost: list = []          # cb(vm, reason): a driver that owns the VM handles a death
        self.on_release = None                 # cb(segment): the registry forgets the segment
        self.guest_wanted = proc is not None   # a guest process should run (supervision)
        self.launched_ns = 0                   # CLOCK_MONOTONIC of the last launch (heartbeat grace)
        self.restarting = False                # restart_guest under way: the supervisor keeps off
        self.lost_pid = 0                      # the guest death already reported to on_guest_lost
        self.resolver: asyncio.Task | None = None   # outbound recovery task, while unresolved

    # ---- construction ------------------------------------------------------
    @classmethod
    def new_id(cls) -> str:
        return secrets.token_hex(4)

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def ctl(self):
        if self.ram is None:
            raise VmError(f"{self.name} is broken: {self.record.broken_reason}")
        return self.ram.ctl

    @property
    def broken(self) -> bool:
        return self.ram is None

    # ---- guest control -----------------------------------------------------
    def start_guest(self, log_path: str | None = None) -> None:
        if self.ram is None:
            raise VmError(f"{self.name} is broken ({self.record.broken_reason}); it has no memory to run")
        self.proc = launch_guest(self.record.segment, log_path=log_path)
        self.record.guest_pid = self.proc.pid
        self.launched_ns = time.monotonic_ns()
        self.guest_wanted = True
        self.lost_pid = 0

    async def restart_guest(self, log_path: str | None, timeout_s: float, run: bool) -> None:
        """A new guest from the memory and vCPU state in the segment: stop and
        reap what is left of the old one, set the command word (RUN or PAUSE),
        launch, and wait until the new guest acknowledges it (running or paused)."""
        self.restarting = True
        try:
            await self.stop_guest(min(timeout_s, STOP_REMAINS_S))
            seq = self.ctl.command(Cmd.RUN if run else Cmd.PAUSE)
            self.start_guest(log_path)
            await self.wait_ack(seq, timeout_s, what="run" if run else "start paused")
        finally:
            self.restarting = False

    def heartbeat_age_s(self) -> float:
        """Seconds since the guest last showed life (its heartbeat, or its launch)."""
        last = max(int(self.ctl.heartbeat_ns), self.launched_ns)
        return max(0.0, (time.monotonic_ns() - last) / 1e9)

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
        """Stop the guest process (STOP, then SIGKILL if it does not obey) and reap it.
        The guest is no longer wanted: the supervisor leaves the VM stopped."""
        self.guest_wanted = False
        if self.proc is None and not self.record.guest_pid:
            return
        if self.guest_alive() and self.ram is not None:
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
        """Close and remove the segment and its disk maps (the guest must be
        stopped; the disk images stay). The file is unlinked even if a stray
        view still pins the mapping (then the memory goes when the view does);
        the registry's segment journal forgets it."""
        unlink_disk_maps(self.record.segment)
        try:
            if self.ram is not None:
                self.ram.close()
        except SegmentError:
            pass
        finally:
            if self.ram is not None:
                self.ram.unlink()
            else:
                unlink_segment(self.record.segment)
            if self.on_release is not None:
                self.on_release(self.record.segment)

    # ---- reporting ---------------------------------------------------------
    def state(self) -> str:
        if self.ram is None:
            return "broken"
        if (self.migrating is not None and self.storage_move is None) or self.record.state == "incoming":
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
        ctl = self.ram.ctl if self.ram is not None else None
        out = {
            "name": r.name,
            "id": r.id,
            "state": self.state(),
            "memory_bytes": r.memory_bytes,
            "workload": r.workload,
            "writes": int(ctl.writes) if ctl else 0,
            "write_rate_pps": int(ctl.rate_pps) if ctl else 0,
            "throttle_pct": int(ctl.throttle_pct) if ctl else 0,
            "guest_pid": r.guest_pid,
            "guest_restarts": r.guest_restarts,
            "segment": r.segment,
            "migration": self.migrating,
            "storage_move": self.storage_move,
            "created_at": r.created_at,
            "io_writes": int(ctl.io_writes) if ctl else 0,
            "io_rate_wps": int(ctl.io_rate_wps) if ctl else 0,
            "disks": [disk_info(d) for d in r.disks],
            "cpu": {"mode": r.cpu["mode"], "vendor": r.cpu["vendor"]} if r.cpu else None,
            "networks": list(r.networks),
        }
        if self.ram is None:
            out["broken_reason"] = r.broken_reason
        if self.hold_reason or self.ram is None:
            out["reason"] = self.hold_reason or r.broken_reason
        return out


def disk_info(d: dict) -> dict:
    """One disk as ``vm show`` lists it: where it is, its virtual size and what it holds."""
    out = {"name": d["name"], "path": d["path"], "size_bytes": d["size_bytes"],
           "attached": bool(d.get("attached"))}
    try:
        out["allocated_bytes"] = os.stat(d["path"]).st_blocks * 512
    except OSError as exc:
        out["allocated_bytes"] = None
        out["error"] = f"{d['path']}: {exc.strerror}"
    return out


def check_workload(spec: str, memory_bytes: int, disk_sizes: list[int] | None = None):
    """The parsed workload, or VmError if it cannot run in this VM (its RAM,
    and with ``disk_sizes`` its disks: io needs one, iows must fit each)."""
    from memstore import WorkloadError, validate_for

    try:
        w = parse_workload(spec)
        validate_for(w, memory_bytes, disk_sizes)
    except WorkloadError as exc:
        raise VmError(str(exc)) from exc
    return w
