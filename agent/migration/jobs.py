"""Jobs: one per migration this agent takes part in (outbound or inbound),
and one per storage move (``StorageJob``, ``kind: "storage"``).

A storage job has its own phases (``StoragePhase``, its own transition
table and compare-and-swap tracker, as phases.py does for migrations)::

    queued -> scanning -> copying -> mirroring -> switching -> pivoting -> completed
    scanning -> switching                  (only renames: nothing to copy)
    any phase before pivoting -> cancelling -> cancelled
    any phase before completed -> failed

``pivoting`` is past the point of no return for cancel: the copies are
verified and the guest is being switched to them (a failure there undoes
the switch itself and fails the job).
"""
from __future__ import annotations

import asyncio
import enum
import secrets
import time
from typing import Final, Mapping

from agent.migration.phases import FINAL, MigrationPhase, PhaseTracker
from agent.migration.stats import MigrationStats

MAX_FINISHED_JOBS = 1000


class Job:
    kind = "live"

    def __init__(self, *, vm: str, source: str, destination: str, direction: str, job_id: str | None = None) -> None:
        self.id = job_id or secrets.token_hex(6)
        self.vm = vm
        self.source = source
        self.destination = destination
        self.direction = direction          # "outbound" | "inbound"
        self.stats = MigrationStats()
        self.error: str | None = None
        self.verified = False
        self.verify_failed = False
        self.peer_agent = ""
        self.slots: int | None = None
        self.priority = 0
        self.streams: int | None = None      # data streams offered (None: migration.streams)
        self.targets: list[str] = [destination] if destination else []
        self.requeues = 0
        self.last_refusal: str | None = None
        self.queued_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._t0 = time.monotonic()
        self.done = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.tracker = PhaseTracker(MigrationPhase.QUEUED)
        self.on_finish = None          # set by JobTable: observers (metrics) learn of the end
        self._progress = 0.0

    @property
    def phase(self) -> MigrationPhase:
        return self.tracker.phase

    def finish(self) -> None:
        self.finished_at = time.time()
        self.done.set()
        if self.on_finish is not None:
            self.on_finish(self)

    def progress(self) -> float:
        """Percent done that never runs backwards: pages sent over pages sent plus
        pages still to send (dirty pages re-enter the total, so the raw ratio can
        dip when a round ends; the reported figure holds its maximum)."""
        s = self.stats
        if self.phase.value in ("completed",):
            self._progress = 100.0
        elif s.pages_sent:
            todo = s.pages_sent + s.remaining_bytes // 4096
            self._progress = max(self._progress, min(99.9, 100.0 * s.pages_sent / todo))
        return round(self._progress, 1)

    def _identity(self) -> dict:
        """The keys every kind of job shows first."""
        return {"id": self.id, "kind": self.kind, "vm": self.vm, "direction": self.direction,
                "source": self.source, "destination": self.destination, "state": self.phase.value}

    def summary(self) -> dict:
        s = self.stats
        return {
            **self._identity(),
            "pages_sent": s.pages_sent,
            "pages_total": s.pages_total,
            "progress_pct": self.progress(),
            # the round under way while pages move, else the rounds completed
            "round": s.rounds + 1 if self.phase.value in ("precopy", "stop-and-copy") else s.rounds,
            "remaining_bytes": s.remaining_bytes,
            "bandwidth_bps": round(s.bandwidth_bps),
            "dirty_rate_pps": round(s.dirty_rate_pps),
            "expected_downtime_ms": round(s.expected_downtime_ms, 1),
            "throttle_pct": s.throttle_pct,
            "eta_s": round(s.remaining_bytes / s.bandwidth_bps, 2) if s.bandwidth_bps and s.remaining_bytes else None,
            "priority": self.priority,
            "requeues": self.requeues,
            "waiting_for": self.last_refusal if self.phase.value == "queued" else None,
            "error": self.error,
            "queued_at": self.queued_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }

    def report(self) -> dict:
        s = self.stats
        phases = dict(self.tracker.durations_ms)
        total_ms = ((self.finished_at or time.time()) - (self.started_at or self.queued_at)) * 1000.0
        status = self.phase.value if self.phase in FINAL else "running"
        return {
            "id": self.id,
            "kind": self.kind,
            "status": status,
            "error": self.error,
            "vm": self.vm,
            "source": self.source,
            "destination": self.destination,
            "direction": self.direction,
            "slots": self.slots,
            "total_ms": round(total_ms, 1),
            "downtime_ms": round(s.downtime_ms, 1),
            "iterations": s.rounds,
            "pages_sent": s.pages_sent,
            "zero_pages": s.zero_pages,
            "pages_total": s.pages_total,
            "bytes_sent": s.bytes_sent,
            "wire_bytes": s.wire_bytes,
            "ram_bytes": s.ram_bytes,
            "throughput_gibps": round(s.bytes_sent / (phases.get("precopy", 0) + phases.get("stop-and-copy", 0)) * 1000 / 2**30, 3)
            if phases.get("precopy") else 0.0,
            "stop_copy_pages": s.stop_copy_pages,
            "throttle_pct": s.throttle_pct,
            "convergence": s.convergence,
            "verified": self.verified,
            "verify_mode": s.verify_mode,
            "verify_ms": round(s.verify_ms, 1),
            "prefault_ms": round(s.prefault_ms, 1),
            "streams": s.streams,
            "guest_rate_before_pps": s.guest_rate_before_pps,
            "guest_rate_during_pps": s.guest_rate_during_pps,
            "writes_at_pause": s.writes_at_pause,
            "writes_after_resume": s.writes_after_resume,
            "phases": {k: round(v, 1) for k, v in phases.items()},
            "rounds": s.round_log,
            "downtime_target_ms": s.downtime_target_ms,
            "max_bandwidth_mibps": s.max_bandwidth_mibps,
            **getattr(self, "storage", {}),           # storage_mode and per-disk figures (disk_section.py)
            "queued_at": self.queued_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class StoragePhase(enum.Enum):
    QUEUED = "queued"
    SCANNING = "scanning"
    COPYING = "copying"
    MIRRORING = "mirroring"
    SWITCHING = "switching"
    PIVOTING = "pivoting"
    COMPLETED = "completed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    FAILED = "failed"


S = StoragePhase
_S_ABORT = frozenset({S.CANCELLING, S.FAILED})
STORAGE_TRANSITIONS: Final[Mapping[StoragePhase, frozenset[StoragePhase]]] = {
    S.QUEUED: frozenset({S.SCANNING}) | _S_ABORT,
    S.SCANNING: frozenset({S.COPYING, S.SWITCHING}) | _S_ABORT,
    S.COPYING: frozenset({S.MIRRORING}) | _S_ABORT,
    S.MIRRORING: frozenset({S.SWITCHING}) | _S_ABORT,
    S.SWITCHING: frozenset({S.PIVOTING}) | _S_ABORT,
    S.PIVOTING: frozenset({S.COMPLETED, S.FAILED}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    S.COMPLETED: frozenset(),
    S.CANCELLED: frozenset(),
    S.FAILED: frozenset(),
}
STORAGE_FINAL: Final = frozenset({S.COMPLETED, S.CANCELLED, S.FAILED})


def StorageTracker(on_change=None) -> PhaseTracker:
    """The phase of one storage job: ``set_phase(expected=, new=)`` along
    STORAGE_TRANSITIONS only (InvalidTransition otherwise), time per phase."""
    return PhaseTracker(S.QUEUED, on_change, transitions=STORAGE_TRANSITIONS, what="storage phase")


class StorageJob(Job):
    """A storage move of one VM's disk images on this host (agent/migration/storage.py
    fills the fields; ``live`` is called before each summary to refresh the
    counters from the running copier)."""

    kind = "storage"

    def __init__(self, *, vm: str, source: str, destination: str, job_id: str | None = None) -> None:
        super().__init__(vm=vm, source=source, destination=destination, direction="local", job_id=job_id)
        self.tracker = StorageTracker()
        self.live = None                       # () -> None: refresh the fields below from the copier
        self.bytes_copied = 0                  # monotone
        self.bytes_remaining = 0               # may rise (the guest dirties blocks)
        self.rounds = 0
        self.mode = ""                         # bulk | rounds | sync (the copier's current step)
        self.write_wait: dict = {}             # guest disk write wait over the move
        self.write_wait_mirroring: dict = {}   # ... while the copier ran (bulk, rounds, synchronous phase)
        self.io_rate_before_wps = 0
        self.io_rate_during_wps = 0
        self.io_pause_ms = 0.0
        self.switch_ms: dict = {}              # where the IO pause went (pause ack, final copy, verify, ...)
        self.held_windows = 0
        self.held_ms_max = 0.0
        self.verify_mismatches = 0
        self.verify_ms = 0.0
        self.disks: list[dict] = []            # per disk: name, from, to, method, bytes_copied, allocated_*
        self.round_log: list[dict] = []
        self.warnings: list[str] = []

    def cancellable(self) -> bool:
        return S.CANCELLING in STORAGE_TRANSITIONS[self.phase]

    def progress(self) -> float:
        if self.phase is S.COMPLETED:
            self._progress = 100.0
        elif self.bytes_copied:
            todo = self.bytes_copied + self.bytes_remaining
            self._progress = max(self._progress, min(99.9, 100.0 * self.bytes_copied / todo))
        return round(self._progress, 1)

    def _refresh(self) -> None:
        if self.live is not None and not self.done.is_set():
            self.live()

    def summary(self) -> dict:
        self._refresh()
        return {
            **self._identity(),
            "mode": self.mode,
            "progress_pct": self.progress(),
            "bytes_copied": self.bytes_copied,
            "bytes_remaining": self.bytes_remaining,
            "rounds": self.rounds,
            "guest_write_wait_ms_p99": self.write_wait.get("p99_ms"),
            "guest_write_wait_ms_max": self.write_wait.get("max_ms"),
            "phases": {k: round(v, 1) for k, v in self.tracker.durations_ms.items()},
            "disks": [d["name"] for d in self.disks],
            "priority": self.priority,
            "error": self.error,
            "queued_at": self.queued_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }

    def report(self) -> dict:
        self._refresh()
        total_ms = ((self.finished_at or time.time()) - (self.started_at or self.queued_at)) * 1000.0
        status = self.phase.value if self.phase in STORAGE_FINAL else "running"
        return {
            "id": self.id,
            "kind": self.kind,
            "status": status,
            "error": self.error,
            "verified": self.verified,
            "vm": self.vm,
            "source": self.source,
            "destination": self.destination,
            "direction": self.direction,
            "total_ms": round(total_ms, 1),
            "io_pause_ms": round(self.io_pause_ms, 2),
            "switch_ms": self.switch_ms,
            "bytes_copied": self.bytes_copied,
            "bytes_remaining": self.bytes_remaining,
            "rounds": self.rounds,
            "held_windows": self.held_windows,
            "held_ms_max": round(self.held_ms_max, 2),
            "verify_mismatches": self.verify_mismatches,
            "verify_ms": round(self.verify_ms, 2),
            "guest_write_wait": self.write_wait,
            "guest_write_wait_mirroring": self.write_wait_mirroring,
            "guest_io_rate_before_wps": self.io_rate_before_wps,
            "guest_io_rate_during_wps": self.io_rate_during_wps,
            "disks": self.disks,
            "round_log": self.round_log,
            "warnings": self.warnings,
            "phases": {k: round(v, 1) for k, v in self.tracker.durations_ms.items()},
            "queued_at": self.queued_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class JobTable:
    """This host's jobs; ``observers`` get ``job_started(job)`` and ``job_finished(job)``
    for live-migration jobs (the migration metrics; storage jobs are not migrations)."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self.observers: list = []

    def _finished(self, job: Job) -> None:
        if job.kind != "live":
            return
        for o in self.observers:
            o.job_finished(job)

    def add(self, job: Job) -> Job:
        self._jobs[job.id] = job
        job.on_finish = self._finished
        for o in self.observers if job.kind == "live" else ():
            o.job_started(job)
        finished = [j for j in self._jobs.values() if j.done.is_set()]
        for j in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self._jobs[j.id]
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def __iter__(self):
        return iter(list(self._jobs.values()))

    def running(self) -> list[Job]:
        return [j for j in self._jobs.values() if not j.done.is_set()]
