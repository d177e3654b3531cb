"""The storage move: a VM's disk images to other files on this host, live.

``livemig storage move VM --dest DIR | --only A,B --dest DIR | --map A=PATH ...``

Per disk the plan (``plan_move``, checked before anything is copied) picks:

- ``rename``: the target is on the source's filesystem *and* a probe file
  renames across the two directories (bind mounts of one filesystem answer
  EXDEV): rename(2) at the switch, nothing copied, reported as such;
- ``mirror``: everything else (another filesystem, a network share): the
  block mirror of agent/migration/disk.py into a staging file
  ``<target dir>/.<name>.livemig-<job>``, renamed to the target at the switch.

Phases (jobs.StoragePhase) and what each does::

    queued     waits for a storage slot (limits.max_storage_migrations, FIFO)
    scanning   re-checks the plan, persists the manifest, creates the staging
               files, starts dirty tracking, scans the data extents
    copying    the bulk pass (test hold after the first chunk)
    mirroring  dirty rounds, then the synchronous phase if they stop shrinking
    switching  disk IO paused: final round, read-back verification, flush
    pivoting   renames (staging -> target, or the source itself), manifest
               "pivoting", reopen every disk in the guest, VM record saved with
               the new paths (the durable switch), disk IO resumed; only then
               are the source files of mirrored disks deleted

Crash safety: ``<data_dir>/storage/<job>.json`` (tmp + fsync + rename) lists
the disks, their staging files with (st_dev, st_ino), the sources'
identities, and the phase. ``recover_moves`` (at agent start, after the VMs
are adopted) undoes a move whose manifest says anything before ``pivoting``
(staging files and renamed copies removed, renamed sources renamed back,
disk IO resumed) and finishes one that says ``pivoting`` (the copies were
verified and are in place: reopen, record, resume, delete the sources). So
after a SIGKILL anywhere each disk is exactly one complete file, and no
file the source needs is deleted before the record names the new one.

Cancel works in every phase before ``pivoting`` and leaves the VM on its
source files; a failure (ENOSPC on the target, a verification that does
not pass, a guest that does not answer) does the same and says why.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass

from memstore import DiskError, DiskMap, GuestRam, pause_disk_io, reopen_disk, resume_disk_io
from memstore.control import DiskIoState

from agent.daemon.files import fsync_dir, json_files, write_json
from agent.errors import AgentError, VmError
from agent.migration.disk import (IO_TIMEOUT_S, DiskMirror, LocalSink, MirrorCancelled, MirrorError, MirrorSet,
                                  WriteWaitMeter)
from agent.migration.jobs import StorageJob, StoragePhase
from agent.migration.testhooks import hold
from agent.observe.logs import get_logger

log = get_logger("livemig.storage")

P = StoragePhase
HOLD_ROLE = "storage"
MANIFEST_DIR = "storage"
FIRST_CHUNK_BLOCKS = 16          # the copying hold comes after this much of the bulk pass


class MoveRefused(AgentError):
    """The move cannot start (bad target, no space...): nothing was touched."""


# ---------------------------------------------------------------------------
# the plan


@dataclass
class DiskPlan:
    index: int
    name: str
    src: str
    dst: str
    size_bytes: int
    method: str = "mirror"               # mirror | rename
    staging: str = ""
    staging_id: list | None = None       # [st_dev, st_ino] once created
    claimed: bool = False                # the copy already has its final name (linked before the pause)
    src_id: list | None = None
    allocated_before: int = 0
    allocated_after: int = 0
    bytes_copied: int = 0

    def as_report(self, io_pause_ms: float, verified: bool) -> dict:
        return {"name": self.name, "from": self.src, "to": self.dst, "method": self.method,
                "bytes_copied": self.bytes_copied, "allocated_before": self.allocated_before,
                "allocated_after": self.allocated_after, "size_bytes": self.size_bytes,
                "io_pause_ms": round(io_pause_ms, 2), "verified": verified}


def _identity(path: str) -> list | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino]


def _renames_across(src_dir: str, dst_dir: str, tag: str) -> bool:
    """Does rename(2) work from ``src_dir`` to ``dst_dir``? (Same st_dev is not
    enough: two bind mounts of one filesystem answer EXDEV.) A probe file,
    created and removed here."""
    probe = os.path.join(src_dir, f".livemig-probe-{tag}")
    moved = os.path.join(dst_dir, f".livemig-probe-{tag}")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    os.close(fd)
    try:
        os.rename(probe, moved)
        return True
    except OSError:
        return False
    finally:
        for p in (probe, moved):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def parse_map(value) -> dict[str, str]:
    """``["A=/x/a.img", ...]`` or ``{"A": "/x/a.img"}`` -> {name: path}."""
    if value is None:
        return {}
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for v in value:
            if not isinstance(v, str) or "=" not in v:
                raise MoveRefused(f"map: expected NAME=PATH, got {v!r}")
            name, _, path = v.partition("=")
            items.append((name, path))
    else:
        raise MoveRefused(f"map: expected a list of NAME=PATH, got {value!r}")
    out: dict[str, str] = {}
    for name, path in items:
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise MoveRefused(f"map: expected NAME=PATH, got {name!r}={path!r}")
        if name in out:
            raise MoveRefused(f"map: disk {name} is mapped twice")
        out[name] = path
    return out


def plan_move(registry, vm, *, dest: str | None, only: list[str] | None, mapping: dict[str, str],
              overwrite: bool, job_id: str) -> list[DiskPlan]:
    """The checked plan of a move (MoveRefused naming the disk and the path
    otherwise). Nothing is created but a rename probe, removed at once."""
    wanted, dest = _wanted_disks(vm, dest, only, mapping)
    in_use = _disks_in_use(registry)
    plans: list[DiskPlan] = []
    targets: dict[str, str] = {}
    for i, d in enumerate(vm.record.disks):
        if d["name"] in wanted:
            dst = _target_path(d, dest, mapping)
            _check_target(d, dst, targets, in_use, overwrite)
            plans.append(_disk_plan(i, d, dst, job_id))
    check_space(plans)
    return plans


def _wanted_disks(vm, dest: str | None, only: list[str] | None, mapping: dict[str, str]) -> tuple[list[str], str | None]:
    disks = vm.record.disks
    if not disks:
        raise MoveRefused(f"{vm.name} has no disks to move")
    names = [d["name"] for d in disks]
    if mapping and (dest or only):
        raise MoveRefused("use either --dest DIR [--only NAMES] or --map NAME=PATH, not both")
    if not mapping and not dest:
        raise MoveRefused("nothing to do: give --dest DIR or --map NAME=PATH")
    wanted = list(mapping) if mapping else (only or names)
    for n in wanted:
        if n not in names:
            raise MoveRefused(f"{vm.name} has no disk {n!r} (its disks: {', '.join(names)})")
    if len(set(wanted)) != len(wanted):
        raise MoveRefused("a disk is named twice")
    if dest is not None:
        dest = os.path.abspath(dest)
        if not os.path.isdir(dest):
            raise MoveRefused(f"destination {dest} is not an existing directory")
    return wanted, dest


def _disks_in_use(registry) -> tuple[dict[str, str], dict[tuple, str]]:
    """Every disk of every VM, by real path and by identity: never a target."""
    in_use: dict[str, str] = {}
    ids_in_use: dict[tuple, str] = {}
    for other in registry:
        for d in other.record.disks:
            label = f"disk {d['name']} of {other.name}"
            in_use[os.path.realpath(d["path"])] = label
            ident = _identity(d["path"])
            if ident is not None:
                ids_in_use[tuple(ident)] = label
    return in_use, ids_in_use


def _target_path(d: dict, dest: str | None, mapping: dict[str, str]) -> str:
    src = d["path"]
    if mapping:
        dst = os.path.abspath(mapping[d["name"]])
        return os.path.join(dst, os.path.basename(src)) if os.path.isdir(dst) else dst
    return os.path.join(dest, os.path.basename(src))


def _check_target(d: dict, dst: str, targets: dict[str, str], in_use, overwrite: bool) -> None:
    src, what = d["path"], f"disk {d['name']}"
    if not os.path.exists(src):
        raise MoveRefused(f"{what}: its image {src} is missing")
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src or _identity(dst) == _identity(src):
        raise MoveRefused(f"{what}: the target {dst} is the source itself")
    if real_dst in targets:
        raise MoveRefused(f"disks {targets[real_dst]} and {d['name']} are both mapped to {dst}")
    targets[real_dst] = d["name"]
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise MoveRefused(f"{what}: the target directory {parent} does not exist")
    by_path, by_id = in_use
    owner = by_path.get(real_dst) or (by_id.get(tuple(_identity(dst))) if _identity(dst) else None)
    if owner:
        raise MoveRefused(f"{what}: the target {dst} is {owner}; it is never overwritten")
    if os.path.lexists(dst):
        if os.path.isdir(dst) and not os.path.islink(dst):
            raise MoveRefused(f"{what}: the target {dst} is a directory")
        if not overwrite:
            raise MoveRefused(f"{what}: the target {dst} exists (use --overwrite to replace it)")


def _disk_plan(i: int, d: dict, dst: str, job_id: str) -> DiskPlan:
    src, parent = d["path"], os.path.dirname(dst)
    st = os.stat(src)
    plan = DiskPlan(index=i, name=d["name"], src=src, dst=dst, size_bytes=d["size_bytes"],
                    src_id=[st.st_dev, st.st_ino], allocated_before=st.st_blocks * 512)
    if st.st_dev == os.stat(parent).st_dev and _renames_across(os.path.dirname(src), parent, job_id):
        plan.method = "rename"
    else:
        plan.staging = os.path.join(parent, f".{os.path.basename(dst)}.livemig-{job_id}")
    return plan


def check_space(plans: list[DiskPlan]) -> None:
    """Free space (statvfs, what an unprivileged writer may use) of each target
    filesystem >= the allocated bytes of the disks mirrored onto it."""
    need: dict[int, list[DiskPlan]] = {}
    for p in plans:
        if p.method == "mirror":
            need.setdefault(os.stat(os.path.dirname(p.dst)).st_dev, []).append(p)
    for group in need.values():
        parent = os.path.dirname(group[0].dst)
        st = os.statvfs(parent)
        free = st.f_bavail * st.f_frsize
        allocated = sum(os.stat(p.src).st_blocks * 512 for p in group)
        if allocated > free:
            names = ", ".join(f"disk {p.name} ({p.src} -> {p.dst})" for p in group)
            raise MoveRefused(f"not enough free space for {names}: {allocated} bytes allocated, "
                              f"{free} bytes free on the filesystem of {parent}")


# ---------------------------------------------------------------------------
# the manifest


def manifest_dir(data_dir: str) -> str:
    return os.path.join(data_dir, MANIFEST_DIR)


def write_manifest(path: str, doc: dict) -> None:
    """tmp + fsync + rename; the directory is fsynced when the manifest is new
    (a rewrite replaces a file that is already durable: after a power loss
    either version is a state recovery handles)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    write_json(path, doc, sync_dir=not os.path.exists(path))


def remove_manifest(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(os.path.dirname(path))


def _unlink_if(path: str, ident: list | None, staging_name: bool) -> bool:
    """Remove ``path`` if it is the file we created (identity), or -- its
    identity not yet recorded -- a staging name only this move uses."""
    if not path or not os.path.lexists(path):
        return False
    if ident is not None and _identity(path) != list(ident):
        return False
    if ident is None and not staging_name:
        return False
    os.unlink(path)
    return True


# ---------------------------------------------------------------------------
# the driver


class StorageMove:
    """One storage move (one job). ``run()`` is the job's task."""

    def __init__(self, host, job: StorageJob, vm, plans: list[DiskPlan], *, overwrite: bool = False,
                 bandwidth_bps: int = 0) -> None:
        self.host = host
        self.job = job
        self.vm = vm
        self.plans = plans
        self.overwrite = overwrite              # a target that exists is replaced at the switch
        self.bandwidth_bps = bandwidth_bps
        self.data_dir = host.cfg.agent.data_dir
        self.manifest = os.path.join(manifest_dir(self.data_dir), f"{job.id}.json")
        self.cancel = threading.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"storage-{job.id}")
        self.mirror: MirrorSet | None = None
        self.meter: WriteWaitMeter | None = None
        self.renamed: list[DiskPlan] = []
        self.reopened: list[DiskPlan] = []
        self.switched = False            # the record names the new files: no way back
        self.io_paused = False
        self._mirror_closed = False
        self._t_pause = 0.0
        job.live = self._refresh
        job.disks = [p.as_report(0.0, False) for p in plans]

    # ---- plumbing ------------------------------------------------------------
    async def _step(self, fn, *args):
        """Run ``fn`` in the move's copier thread (one at a time, in order)."""
        fut = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            self.cancel.set()            # the copier stops at its next check; cleanup queues behind it
            raise

    def _phase(self, expected, new: StoragePhase) -> None:
        old = self.job.phase
        self.job.tracker.set_phase(expected=expected, new=new)
        log.info("storage_phase", job=self.job.id, vm=self.vm.name, old=old.value, new=new.value)

    def _doc(self, phase: str) -> dict:
        return {"job": self.job.id, "vm": self.vm.name, "segment": self.vm.record.segment, "phase": phase,
                "disks": [asdict(p) for p in self.plans], "written_at": time.time()}

    def _save_manifest(self, phase: str) -> None:
        write_manifest(self.manifest, self._doc(phase))

    def _refresh(self) -> None:
        m, job = self.mirror, self.job
        if m is not None:
            job.bytes_copied = max(job.bytes_copied, m.bytes_copied)
            job.bytes_remaining = m.remaining_bytes()
            job.rounds = len(m.rounds)
            job.mode = m.mode
            job.verify_mismatches = m.mismatches
            job.held_windows = len(m.held)
            job.held_ms_max = max(m.held, default=0.0)
            job.round_log = [r.as_dict() for r in m.rounds]
        if self.meter is not None:
            job.write_wait = self.meter.summary()
            job.write_wait_mirroring = self.meter.summary(("copying", "mirroring"))

    # ---- the job ---------------------------------------------------------------
    async def run(self) -> None:
        job, vm = self.job, self.vm
        slot = False
        try:
            await self.host.storage_slots.acquire(job.priority)
            slot = True
            job.started_at = time.time()
            await self._move()
            self._phase(P.PIVOTING, P.COMPLETED)
            self._refresh()
            log.info("storage_move_completed", job=job.id, vm=vm.name, io_pause_ms=round(job.io_pause_ms, 2),
                     bytes_copied=job.bytes_copied, rounds=job.rounds)
        except asyncio.CancelledError:
            await self._abort(None)
            raise
        except Exception as exc:             # noqa: BLE001 - the job records why; the VM stays on its files
            await self._abort(exc)
        finally:
            if slot:
                self.host.storage_slots.release()
            self._finish()

    def _finish(self) -> None:
        vm, job = self.vm, self.job
        self._refresh()
        if self.meter is not None:
            self.meter.stop()
        self._executor.shutdown(wait=False)
        if vm.storage_move == job.id:
            vm.storage_move = None
        if vm.migrating == job.id:
            vm.migrating = None
        job.live = None
        job.finish()

    async def _move(self) -> None:
        job, vm, plans = self.job, self.vm, self.plans
        self._phase(P.QUEUED, P.SCANNING)
        check_space(plans)                               # again: the queue may have taken a while
        if vm.broken or not vm.guest_alive():
            raise MoveRefused(f"{vm.name} is {vm.state()}: its guest must run (or be paused) to move its disks")
        ctl = vm.ctl
        self.meter = WriteWaitMeter(lambda: ctl.io_writes).start()
        job.io_rate_before_wps = int(ctl.io_rate_wps)
        self._save_manifest("scanning")                   # before any staging file exists
        mirrored = [p for p in plans if p.method == "mirror"]
        if mirrored:
            await self._step(self._setup_mirror, mirrored)
            self._save_manifest("copying")
            self._phase(P.SCANNING, P.COPYING)
            self.meter.mark("copying")
            done = await self._step(self.mirror.bulk, FIRST_CHUNK_BLOCKS)
            await hold(self.data_dir, HOLD_ROLE, P.COPYING.value, job.id)
            if not done:
                await self._step(self.mirror.bulk)
            self._phase(P.COPYING, P.MIRRORING)
            self._save_manifest("mirroring")
            self.meter.mark("mirroring")
            await hold(self.data_dir, HOLD_ROLE, P.MIRRORING.value, job.id)
            await self._step(self.mirror.converge)
            job.io_rate_during_wps = int(ctl.io_rate_wps)
            self._phase(P.MIRRORING, P.SWITCHING)
        else:
            self._phase(P.SCANNING, P.SWITCHING)
        if mirrored:
            await self._step(self._claim_targets)
        self._save_manifest("switching")
        await hold(self.data_dir, HOLD_ROLE, P.SWITCHING.value, job.id)
        self.meter.mark("switching")
        t_verify = time.monotonic()
        await self._step(self._prepare_switch)
        job.verify_ms = (time.monotonic() - t_verify) * 1000.0
        if self.cancel.is_set():
            raise MirrorCancelled("cancelled")
        self._phase(P.SWITCHING, P.PIVOTING)             # from here on: no cancel
        await self._pivot()

    # ---- steps run in the copier thread ------------------------------------------------
    def _setup_mirror(self, mirrored: list[DiskPlan]) -> None:
        disks: list[DiskMirror] = []
        try:
            for p in mirrored:
                sink = LocalSink(p.staging, p.size_bytes)
                p.staging_id = list(sink.identity)
                try:
                    disks.append(DiskMirror(p.index, p.name, self.vm.record.segment, p.src, sink))
                except BaseException:
                    sink.close()
                    raise
                self._save_manifest("scanning")          # with the staging identity
            self.mirror = MirrorSet(disks, self.vm.ctl, bandwidth_bps=self.bandwidth_bps, cancel=self.cancel)
            self.mirror.start_tracking()
        except BaseException:
            if self.mirror is None:
                for d in disks:
                    d.sink.close()
                    d.close()
            raise

    def _prepare_switch(self) -> None:
        """Pause the disk IO; mirrored disks: final round + verification (disk.py)."""
        if self.mirror is not None:
            self.mirror.prepare_switch()              # returns with the IO paused, or resumed + raised
            self._t_pause = self.mirror.switch_pause_started
        else:
            self._t_pause = time.monotonic()
            pause_disk_io(self.vm.ctl, IO_TIMEOUT_S)
        self.io_paused = True

    def _sink_of(self, p: DiskPlan) -> LocalSink | None:
        if self.mirror is None:
            return None
        return next((d.sink for d in self.mirror.disks if d.index == p.index), None)

    def _claim_targets(self) -> None:
        """Before the pause: give each copy its final name where nothing is
        there yet, with link + unlink (a link never replaces a file), so the
        pause holds no rename of a mirrored disk and no directory fsync. A
        target that exists (--overwrite), or a filesystem without hard links,
        is renamed in the pause instead."""
        dirs = set()
        for p in self.plans:
            if p.method != "mirror" or p.claimed or os.path.lexists(p.dst):
                continue
            try:
                os.link(p.staging, p.dst)
            except OSError:
                continue
            os.unlink(p.staging)
            p.claimed = True
            self.renamed.append(p)
            sink = self._sink_of(p)
            if sink is not None:
                sink.path = p.dst
            dirs.add(os.path.dirname(p.dst))
        for d in dirs:
            fsync_dir(d)

    def _rename_in_pause(self) -> None:
        """IO paused: the renames left (a target replaced with --overwrite, a
        copy that could not be linked, the renamed-not-copied disks), then
        the manifest says ``pivoting``: from its fsync on, a restart finishes
        the move instead of undoing it. Directory fsyncs come after the resume."""
        for p in self.plans:
            if p.claimed:
                continue
            if os.path.lexists(p.dst) and not self.overwrite:
                raise MoveRefused(f"disk {p.name}: the target {p.dst} appeared during the move "
                                  f"(use --overwrite to replace it)")
            if p.method == "mirror":
                os.replace(p.staging, p.dst)
                sink = self._sink_of(p)
                if sink is not None:
                    sink.path = p.dst
            else:
                os.replace(p.src, p.dst)
            self.renamed.append(p)
        self._save_manifest("pivoting")

    def _sync_dirs(self) -> None:
        for d in {os.path.dirname(p.dst) for p in self.plans} | \
                {os.path.dirname(p.src) for p in self.plans if p.method == "rename"}:
            fsync_dir(d)

    def _reopen_all(self) -> None:
        ram = self.vm.ram
        for p in self.plans:
            reopen_disk(ram, p.index, p.dst, IO_TIMEOUT_S)
            self.reopened.append(p)

    def _resume_io(self) -> float:
        if self.io_paused:
            resume_disk_io(self.vm.ctl, IO_TIMEOUT_S)
            self.io_paused = False
            if self.mirror is not None:
                self.mirror.io_paused_at = None
        return (time.monotonic() - self._t_pause) * 1000.0

    def _delete_sources(self) -> list[str]:
        warnings = []
        dirs = set()
        for p in self.plans:
            if p.method != "mirror":
                continue
            try:
                if _identity(p.src) == p.src_id:
                    os.unlink(p.src)
                    dirs.add(os.path.dirname(p.src))
                else:
                    warnings.append(f"disk {p.name}: {p.src} changed since the move started; not deleted")
            except OSError as exc:
                warnings.append(f"disk {p.name}: cannot delete the old image {p.src}: {exc}")
        for d in dirs:
            try:
                fsync_dir(d)
            except OSError:
                pass
        return warnings

    def _close_mirror(self) -> None:
        if self.mirror is not None and not self._mirror_closed:
            self._mirror_closed = True
            for d in self.mirror.disks:
                p = next(pl for pl in self.plans if pl.index == d.index)
                p.bytes_copied = d.c.bytes_copied
                d.sink.close()
            self.mirror.close()

    # ---- the switch ----------------------------------------------------------------------
    async def _pivot(self) -> None:
        """IO paused, copies verified: rename, manifest ``pivoting``, reopen in
        the guest, resume; then the record (the durable switch), then the
        sources go. A failure before the reopens finished undoes it all."""
        job, vm = self.job, self.vm
        t0 = time.monotonic()
        try:
            await self._step(self._rename_in_pause)
            t1 = time.monotonic()
            await hold(self.data_dir, HOLD_ROLE, P.PIVOTING.value, job.id)
            t2 = time.monotonic()
            await self._step(self._reopen_all)
            t3 = time.monotonic()
        except BaseException as exc:
            log.error("storage_pivot_failed", job=job.id, vm=vm.name, error=str(exc))
            await self._step(self._undo_pivot)
            raise
        self.switched = True                 # the guest writes the new files once resumed: forward only
        try:
            job.io_pause_ms = await self._step(self._resume_io)
        except (DiskError, OSError) as exc:
            job.warnings.append(f"disk IO of {vm.name} did not resume: {exc}")
        spent = dict(self.mirror.switch_ms) if self.mirror is not None else {}
        spent.update(rename_and_manifest=(t1 - t0) * 1000.0, reopen=(t3 - t2) * 1000.0,
                     resume=(time.monotonic() - t3) * 1000.0)
        job.switch_ms = {k: round(v, 2) for k, v in spent.items()}
        self.meter.mark("after")
        await self._step(self._sync_dirs)
        for p in self.plans:                                    # the durable switch, before any delete
            vm.record.disks[p.index]["path"] = p.dst
        self.host.registry.save(vm)
        await self._step(self._close_mirror)
        job.warnings.extend(await self._step(self._delete_sources))
        for p in self.plans:
            try:
                p.allocated_after = os.stat(p.dst).st_blocks * 512
            except OSError:
                pass
        job.verified = True
        job.disks = [p.as_report(job.io_pause_ms, True) for p in self.plans]
        remove_manifest(self.manifest)

    def _undo_pivot(self) -> None:
        """Before the record names the new files: every disk back on its source
        (renamed sources renamed back first, then the guest reopens them).
        Idempotent; renamed staging files are removed by _rollback."""
        for p in reversed([p for p in self.renamed if p.method == "rename"]):
            os.replace(p.dst, p.src)
            fsync_dir(os.path.dirname(p.src))
            self.renamed.remove(p)
        ram = self.vm.ram
        for p in reversed(self.reopened):
            reopen_disk(ram, p.index, p.src, IO_TIMEOUT_S)
            self.reopened.remove(p)

    # ---- failure / cancel ------------------------------------------------------------------
    async def _abort(self, exc: BaseException | None) -> None:
        job, vm = self.job, self.vm
        cancelled = exc is None or isinstance(exc, MirrorCancelled)
        if cancelled:
            job.error = "cancelled"
        else:
            job.error = _describe(exc, self.plans)
        log.warning("storage_move_aborted", job=job.id, vm=vm.name, phase=job.phase.value, error=job.error)
        self.cancel.set()
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._rollback)
        except Exception as rexc:            # noqa: BLE001 - reported; the manifest stays for the restart
            log.error("storage_rollback_failed", job=job.id, vm=vm.name, error=repr(rexc))
            job.warnings.append(f"cleanup incomplete ({rexc}); the agent's next start finishes it")
        if cancelled and job.cancellable():
            self._phase(job.phase, P.CANCELLING)
            self._phase(P.CANCELLING, P.CANCELLED)
        elif job.phase not in (P.COMPLETED, P.CANCELLED, P.FAILED):
            self._phase(job.phase, P.FAILED)

    def _rollback(self) -> None:
        """Back to the source files: IO resumed, staging and renamed copies removed."""
        if self.switched:
            return
        self._undo_pivot()
        if self.io_paused:
            self._resume_io()
        if self.mirror is not None:
            self.mirror.resume_io()                   # a held window cut short (no-op otherwise)
        self._close_mirror()
        for p in self.plans:
            if p.method == "mirror":
                _unlink_if(p.staging, p.staging_id, staging_name=True)
                if p in self.renamed:
                    _unlink_if(p.dst, p.staging_id, staging_name=False)
        remove_manifest(self.manifest)


def _describe(exc: BaseException, plans: list[DiskPlan]) -> str:
    if isinstance(exc, DiskError) and exc.errno == errno.ENOSPC:
        where = ", ".join(f"disk {p.name} -> {p.staging or p.dst}" for p in plans if p.method == "mirror")
        return f"ENOSPC: no space left on the target filesystem ({where}): {exc}"
    return str(exc)


# ---------------------------------------------------------------------------
# the request


def new_job_id() -> str:
    return secrets.token_hex(6)


def start_move(agent, vm, plans: list[DiskPlan], job_id: str, *, overwrite: bool, bandwidth_bps: int,
               priority: int, destination: str) -> StorageJob:
    host = agent.host
    job = StorageJob(vm=vm.name, source=host.name, destination=destination, job_id=job_id)
    job.priority = priority
    host.jobs.add(job)
    vm.migrating = vm.storage_move = job.id
    move = StorageMove(host, job, vm, plans, overwrite=overwrite, bandwidth_bps=bandwidth_bps)
    job.task = agent.jobs.spawn(move.run(), f"storage:{job.id}:{vm.name}", cancellable=job.cancellable)
    log.info("storage_move_queued", job=job.id, vm=vm.name,
             disks=[(p.name, p.src, p.dst, p.method) for p in plans])
    return job


# ---------------------------------------------------------------------------
# recovery at start


def recover_moves(host) -> dict[str, list[str]]:
    """Finish or undo every move a killed agent left (see the module doc).
    Runs after the registry adopted the VMs (their guests run), before the
    agent accepts requests. Blocking: call it in a thread."""
    out: dict[str, list[str]] = {"undone": [], "finished": [], "failed": []}
    mdir = manifest_dir(host.cfg.agent.data_dir)
    if not os.path.isdir(mdir):
        return out
    for fn, path in json_files(mdir):
        try:
            with open(path) as f:
                doc = json.load(f)
            plans = [DiskPlan(**d) for d in doc["disks"]]
            vm = _find_vm(host.registry, doc)
            if doc["phase"] in ("pivoting", "switched"):
                _roll_forward(host, vm, plans)
                out["finished"].append(doc["job"])
            else:
                _roll_back(vm, plans)
                out["undone"].append(doc["job"])
            remove_manifest(path)
            log.info("storage_move_recovered", job=doc["job"], vm=doc["vm"], phase=doc["phase"],
                     action="finished" if doc["phase"] in ("pivoting", "switched") else "undone")
        except Exception as exc:             # noqa: BLE001 - one bad manifest must not stop the agent
            log.error("storage_recovery_failed", manifest=path, error=repr(exc),
                      action="manifest kept; the next start tries again")
            out["failed"].append(fn)
    return out


def _find_vm(registry, doc: dict):
    try:
        vm = registry.get(doc["vm"])
    except VmError:
        return None
    return vm if vm.record.segment == doc["segment"] and not vm.broken else None


def _io(vm) -> GuestRam | None:
    return vm.ram if vm is not None and vm.guest_alive() else None


def _resume_if_paused(vm) -> None:
    ram = _io(vm)
    if ram is not None and ram.ctl.disk_io_state is DiskIoState.PAUSED:
        resume_disk_io(ram.ctl, IO_TIMEOUT_S)


def _roll_back(vm, plans: list[DiskPlan]) -> None:
    """Before pivoting: every disk stays (or goes back) on its source."""
    for p in plans:
        if p.method == "rename":
            if not os.path.exists(p.src) and p.src_id and _identity(p.dst) == p.src_id:
                os.replace(p.dst, p.src)              # renamed, not yet switched: rename back
                fsync_dir(os.path.dirname(p.src))
        else:
            _unlink_if(p.staging, p.staging_id, staging_name=True)
            if p.staging_id and _identity(p.dst) == p.staging_id:
                os.unlink(p.dst)                      # renamed staging file, never switched to
    ram = _io(vm)
    if ram is not None:
        for p in plans:
            with DiskMap.attach(ram.name, p.index) as dm:
                if dm.path != p.src:                  # cannot happen before pivoting; be sure anyway
                    pause_disk_io(ram.ctl, IO_TIMEOUT_S)
                    reopen_disk(ram, p.index, p.src, IO_TIMEOUT_S)
    _resume_if_paused(vm)


def _roll_forward(host, vm, plans: list[DiskPlan]) -> None:
    """Pivoting: the copies are verified and in place; switch to them for good."""
    if vm is None:
        raise MirrorError("the VM of this move is gone; both files kept for the operator")
    for p in plans:
        if not os.path.exists(p.dst):
            raise MirrorError(f"disk {p.name}: {p.dst} is missing; nothing deleted")
    ram = _io(vm)
    if ram is not None:
        pause_disk_io(ram.ctl, IO_TIMEOUT_S)
        for p in plans:
            with DiskMap.attach(ram.name, p.index) as dm:
                current = dm.path
            if current != p.dst:
                reopen_disk(ram, p.index, p.dst, IO_TIMEOUT_S)
    else:
        for p in plans:                           # no guest writes the maps now: the next one opens dst
            with DiskMap.attach(vm.record.segment, p.index) as dm:
                dm.commit_path(p.dst)
    for p in plans:
        vm.record.disks[p.index]["path"] = p.dst
    host.registry.save(vm)
    _resume_if_paused(vm)
    for p in plans:
        if p.method == "mirror" and p.src_id and _identity(p.src) == p.src_id:
            os.unlink(p.src)
