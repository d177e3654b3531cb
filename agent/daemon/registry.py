"""VmRegistry: the VMs on this host, persisted in ``<data_dir>/vms/``.

Each VM has a JSON record written atomically (tmp + rename). At start the
registry reconciles records with reality (``adopt``):

- a running/paused VM whose guest process is alive is re-adopted as is
  (a ``running`` one whose guest is paused is resumed: see ``adopt``; a
  ``paused`` one, paused for an outbound switchover when the agent died,
  stays paused: the destination may be running it);
- a running/paused VM whose segment survived but whose guest died gets a new
  guest that continues from the vCPU state in the segment;
- an ``incoming`` record (a destination shell of a migration that never
  reached resume) is discarded: the source still owns that VM;
- a segment with this agent's prefix and no record is an orphan: removed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

import signal

import psutil

from memstore import Cmd, GuestRam, is_guest_process, list_segments, unlink_segment

from agent.errors import VmError
from agent.observe.logs import get_logger
from agent.daemon.vm import Vm, VmRecord

log = get_logger("livemig.registry")


def _kill(pid: int) -> None:
    try:
        p = psutil.Process(pid)
        p.send_signal(signal.SIGKILL)
        p.wait(5)
    except (psutil.NoSuchProcess, psutil.TimeoutExpired):
        pass


class VmRegistry:
    def __init__(self, data_dir: str, shm_prefix: str, agent_name: str) -> None:
        self.dir = os.path.join(data_dir, "vms")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.segment_prefix = f"{shm_prefix}.{agent_name}."
        self._vms: dict[str, Vm] = {}
        self.reserved: dict[str, int] = {}     # names held by inbound migrations before their shell exists

    def segment_name(self, vm: str, vm_id: str) -> str:
        return f"{self.segment_prefix}{vm}.{vm_id}"

    # ---- lookups -----------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._vms or name in self.reserved

    def __iter__(self) -> Iterator[Vm]:
        return iter(list(self._vms.values()))

    def __len__(self) -> int:
        return len(self._vms)

    def get(self, name: str) -> Vm:
        try:
            return self._vms[name]
        except KeyError:
            raise VmError(f"no VM named {name!r} on this host") from None

    def committed_memory(self) -> int:
        """Guest RAM held or promised on this host (VMs + reservations)."""
        return sum(v.record.memory_bytes for v in self._vms.values()) + sum(self.reserved.values())

    # ---- changes -----------------------------------------------------------
    def add(self, vm: Vm) -> None:
        if vm.name in self._vms:
            raise VmError(f"a VM named {vm.name!r} already exists on this host")
        self._vms[vm.name] = vm
        self.save(vm)

    def save(self, vm: Vm) -> None:
        path = os.path.join(self.dir, f"{vm.name}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(vm.record), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def remove(self, vm: Vm) -> None:
        self._vms.pop(vm.name, None)
        try:
            os.unlink(os.path.join(self.dir, f"{vm.name}.json"))
        except FileNotFoundError:
            pass

    # ---- restart -----------------------------------------------------------
    def records(self) -> list[VmRecord]:
        out = []
        for fn in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, fn)
            if fn.endswith(".tmp"):
                os.unlink(path)
                continue
            if not fn.endswith(".json"):
                continue
            try:
                with open(path) as f:
                    out.append(VmRecord(**json.load(f)))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("vm_record_unreadable", path=path, error=str(exc))
        return out

    def adopt(self, guest_log_dir: str | None = None) -> dict[str, list[str]]:
        """Reconcile records, segments and guest processes after a (re)start."""
        result: dict[str, list[str]] = {"adopted": [], "restarted": [], "paused": [], "discarded": [], "orphans": []}
        keep: set[str] = set()
        for rec in self.records():
            path = os.path.join(self.dir, f"{rec.name}.json")
            if rec.state == "incoming":
                if rec.guest_pid and is_guest_process(rec.guest_pid, rec.segment):
                    _kill(rec.guest_pid)          # the standby guest of an unfinished shell
                unlink_segment(rec.segment)
                os.unlink(path)
                result["discarded"].append(rec.name)
                continue
            try:
                ram = GuestRam.attach(rec.segment)
            except Exception as exc:
                log.error("vm_lost", vm=rec.name, segment=rec.segment, error=str(exc))
                os.unlink(path)
                result["discarded"].append(rec.name)
                continue
            vm = Vm(rec, ram)
            if vm.guest_alive():
                result["adopted"].append(rec.name)
            else:
                log_path = os.path.join(guest_log_dir, f"{rec.name}.log") if guest_log_dir else None
                if rec.state == "paused":
                    ram.ctl.command(Cmd.PAUSE)
                vm.start_guest(log_path)
                result["restarted"].append(rec.name)
            if rec.state == "running" and ram.ctl.cmd != Cmd.RUN:
                # Saved as running but paused: a destination that crashed between
                # taking ownership (record first) and resuming its standby guest.
                ram.ctl.command(Cmd.RUN)
            elif rec.state == "paused":
                # Paused for an outbound switchover when this agent died: the
                # destination may run the VM now. Left paused for the operator.
                result["paused"].append(rec.name)
            self._vms[rec.name] = vm
            self.save(vm)
            keep.add(rec.segment)
        for seg in list_segments(self.segment_prefix):
            if seg not in keep:
                unlink_segment(seg)
                result["orphans"].append(seg)
        return result
