"""VmRegistry: the VMs on this host, persisted in ``<data_dir>/vms/``.

Each VM has a JSON record written atomically (tmp + rename). Every segment
this agent creates is first appended (and fsynced) to the journal
``<data_dir>/segments`` and dropped from it once unlinked, so that the
agent can tell its own leftovers from anyone else's.

At start the registry reconciles records with reality (``adopt``), after
the agent holds its locks:

- a running/paused VM whose guest process is alive is re-adopted as is
  (a ``running`` one whose guest is paused is resumed, a ``paused`` one
  whose guest runs is paused); the throttle is reset to 0;
- a running/paused VM whose segment survived but whose guest died gets a new
  guest that continues from the vCPU state in the segment;
- a ``paused`` VM with ``record.outbound`` set was paused by an outbound
  switchover when the agent died: it stays paused until the destination
  says how the migration ended (``agent.migration.recovery``); a ``paused``
  VM without it was paused by the operator and stays paused;
- a record whose segment does not attach is kept as ``broken`` (with the
  reason), never unlinked: it may be the VM's only copy;
- an ``incoming`` record (a destination shell of a migration that never
  reached resume) is discarded: the source still owns that VM.

Then, once both endpoints are bound, ``sweep_orphans`` removes a segment
with this agent's prefix only if the journal proves this agent created it
and no record holds it; any other segment with the prefix is left alone.
A disk map (``<segment>.d<i>``, memstore.disk) goes with the segment it
names: kept with a kept segment, removed with a journaled orphan (or when
its segment is journaled but already gone), left alone otherwise. The disk
images themselves are files the records name; the sweep never touches them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Iterator

import psutil

from memstore import (Cmd, GuestRam, find_guests, is_guest_process, list_segments, parse_disk_map_name,
                      segment_exists, segment_path, unlink_disk_maps, unlink_segment)

from agent.daemon.files import fsync_dir, json_files, write_json
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


class SegmentJournal:
    """The names of the segments this agent created and has not unlinked yet.

    ``add`` appends and fsyncs *before* the segment exists; ``forget``
    rewrites the file without the name (tmp + fsync + rename)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._names: dict[str, None] = {}
        try:
            with open(path) as f:
                for line in f:
                    if line.strip():
                        self._names[line.strip()] = None
        except FileNotFoundError:
            with open(path, "a"):
                pass
            fsync_dir(os.path.dirname(path))

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def names(self) -> list[str]:
        return list(self._names)

    def add(self, name: str) -> None:
        if name in self._names:
            return
        with open(self.path, "a") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._names[name] = None

    def forget(self, name: str) -> None:
        if name not in self._names:
            return
        del self._names[name]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(n + "\n" for n in self._names))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class VmRegistry:
    def __init__(self, data_dir: str, shm_prefix: str, agent_name: str) -> None:
        self.dir = os.path.join(data_dir, "vms")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.guest_log_dir = os.path.join(data_dir, "guests")
        os.makedirs(self.guest_log_dir, mode=0o700, exist_ok=True)
        self.segment_prefix = f"{shm_prefix}.{agent_name}."
        self.journal = SegmentJournal(os.path.join(data_dir, "segments"))
        self._vms: dict[str, Vm] = {}
        self._running_guests: dict[str, list[int]] = {}     # at adopt: guest processes by segment
        self.reserved: dict[str, int] = {}     # names held by inbound migrations before their shell exists

    def segment_name(self, vm: str, vm_id: str) -> str:
        return f"{self.segment_prefix}{vm}.{vm_id}"

    def guest_log(self, vm: str) -> str:
        return os.path.join(self.guest_log_dir, f"{vm}.log")

    # ---- segments ----------------------------------------------------------
    def create_segment(self, vm_name: str, vm_id: str, size_bytes: int) -> GuestRam:
        """Journal the segment's name (durably), then create it. The caller owns
        the result; ``Vm.release()`` (or ``forget_segment``) drops it again."""
        name = self.segment_name(vm_name, vm_id)
        self.journal.add(name)
        try:
            return GuestRam.create(name, size_bytes)
        except BaseException:
            self.journal.forget(name)
            raise

    def forget_segment(self, name: str) -> None:
        """The segment was unlinked: it is no longer this agent's to sweep."""
        self.journal.forget(name)

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

    def holds(self, vm: Vm) -> bool:
        """True if ``vm`` (this very object) is still registered."""
        return self._vms.get(vm.name) is vm

    def committed_memory(self) -> int:
        """Guest RAM held or promised on this host (VMs + reservations)."""
        return sum(v.record.memory_bytes for v in self._vms.values()) + sum(self.reserved.values())

    # ---- changes -----------------------------------------------------------
    def add(self, vm: Vm) -> None:
        if vm.name in self._vms:
            raise VmError(f"a VM named {vm.name!r} already exists on this host")
        vm.on_release = self.forget_segment
        self._vms[vm.name] = vm
        self.save(vm)

    def save(self, vm: Vm) -> None:
        write_json(os.path.join(self.dir, f"{vm.name}.json"), dataclasses.asdict(vm.record))

    def remove(self, vm: Vm) -> None:
        """Forget the VM: its record, its guest log and (if the segment is gone) its journal entry."""
        if self._vms.get(vm.name) is vm:
            del self._vms[vm.name]
        for path in (os.path.join(self.dir, f"{vm.name}.json"), self.guest_log(vm.name)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if not segment_exists(vm.record.segment):
            self.journal.forget(vm.record.segment)

    # ---- restart -----------------------------------------------------------
    def records(self) -> list[VmRecord]:
        out = []
        for _fn, path in json_files(self.dir):
            try:
                with open(path) as f:
                    out.append(VmRecord(**json.load(f)))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("vm_record_unreadable", path=path, error=str(exc))
        return out

    def adopt(self) -> dict[str, list[str]]:
        """Reconcile records, segments and guest processes after a (re)start."""
        result: dict[str, list[str]] = {"adopted": [], "restarted": [], "paused": [], "held": [],
                                        "broken": [], "discarded": []}
        self._running_guests = find_guests(self.segment_prefix)      # {segment: [pid]}, whatever the records say
        for rec in self.records():
            if rec.state == "incoming":
                self._discard_incoming(rec)
                result["discarded"].append(rec.name)
                continue
            self.journal.add(rec.segment)          # a record proves the segment is ours
            vm = self._attach(rec)
            vm.on_release = self.forget_segment
            self._vms[rec.name] = vm
            if vm.broken:
                result["broken"].append(rec.name)
            else:
                self._reconcile(vm, result)
            self.save(vm)
        return result

    def _discard_incoming(self, rec: VmRecord) -> None:
        """The shell of an inbound migration that never reached resume: the source owns the VM."""
        pids = set(self._running_guests.get(rec.segment, []))
        if rec.guest_pid and is_guest_process(rec.guest_pid, rec.segment):
            pids.add(rec.guest_pid)
        for pid in pids:
            _kill(pid)                    # the standby guest of an unfinished shell
        unlink_disk_maps(rec.segment)
        unlink_segment(rec.segment)
        self.journal.forget(rec.segment)
        for path in (os.path.join(self.dir, f"{rec.name}.json"), self.guest_log(rec.name)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        log.info("incoming_shell_discarded", vm=rec.name, segment=rec.segment)

    def _attach(self, rec: VmRecord) -> Vm:
        """A Vm on the record's segment, or a broken one (kept, never unlinked)."""
        if rec.state == "broken":
            return Vm(rec, None)                  # stays broken until ``vm start`` attaches it
        try:
            return Vm(rec, GuestRam.attach(rec.segment))
        except Exception as exc:
            rec.state = "broken"
            rec.broken_reason = f"segment {rec.segment} does not attach: {exc}"
            log.error("vm_broken", vm=rec.name, segment=rec.segment, error=str(exc))
            return Vm(rec, None)

    def _reconcile(self, vm: Vm, result: dict[str, list[str]]) -> None:
        rec, ctl = vm.record, vm.ctl
        ctl.throttle_pct = 0                      # a migration that set it is gone
        if rec.outbound and rec.state == "running":
            # Saved before the pause, and the pause never happened: nothing switched over.
            log.info("outbound_dropped_before_switchover", vm=rec.name, outbound=rec.outbound)
            rec.outbound = None
        found = self._running_guests.get(rec.segment, [])
        if not vm.guest_alive() and len(found) == 1:
            # Launched, then the agent died before the record had the new pid: that guest is the VM's.
            log.info("guest_found_by_segment", vm=rec.name, recorded_pid=rec.guest_pid, pid=found[0])
            rec.guest_pid = found[0]
        if vm.guest_alive():
            vm.guest_wanted = True
            vm.launched_ns = time.monotonic_ns()  # heartbeat grace, as for a new guest
            result["adopted"].append(rec.name)
        else:
            ctl.command(Cmd.PAUSE if rec.state == "paused" else Cmd.RUN)
            vm.start_guest(self.guest_log(rec.name))
            rec.guest_restarts += 1
            result["restarted"].append(rec.name)
        if rec.state == "running" and ctl.cmd != Cmd.RUN:
            # Saved as running but paused: a destination that crashed between
            # taking ownership (record first) and resuming its standby guest.
            ctl.command(Cmd.RUN)
        elif rec.state == "paused":
            if ctl.cmd != Cmd.PAUSE:
                ctl.command(Cmd.PAUSE)            # the record is the intent: paused means paused
            result["held" if rec.outbound else "paused"].append(rec.name)

    def sweep_orphans(self) -> dict[str, list[str]]:
        """Remove segments this agent created (journal) that no record holds; keep the rest.
        Run only once the agent holds its locks and both endpoints are bound."""
        keep = {vm.record.segment for vm in self._vms.values()}
        result: dict[str, list[str]] = {"orphans": [], "foreign": []}
        maps: list[tuple[str, str]] = []
        for seg in list_segments(self.segment_prefix):
            parsed = parse_disk_map_name(seg)
            if parsed is not None and parsed[0].startswith(self.segment_prefix):
                maps.append((seg, parsed[0]))      # decided with its segment, below
                continue
            if seg in keep:
                continue
            if seg in self.journal:
                unlink_segment(seg)
                self.journal.forget(seg)
                result["orphans"].append(seg)
            else:
                log.warning("segment_not_ours_kept", segment=seg,
                            why="not in this agent's segment journal; remove it by hand if it is garbage")
                result["foreign"].append(seg)
        for name, seg in maps:
            if seg in keep:
                continue
            if seg in self.journal or seg in result["orphans"]:   # its segment is (or was just) swept
                try:
                    os.unlink(segment_path(name))
                except FileNotFoundError:
                    pass
                result["orphans"].append(name)
            else:
                log.warning("segment_not_ours_kept", segment=name,
                            why="a disk map of a segment not in this agent's journal; remove it by hand "
                                "if it is garbage")
                result["foreign"].append(name)
        for name in self.journal.names():
            if name not in keep and not segment_exists(name):
                self.journal.forget(name)         # unlinked by someone else: nothing left to sweep
        return result
