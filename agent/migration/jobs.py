"""Jobs: one per migration this agent takes part in (outbound or inbound)."""
from __future__ import annotations

import asyncio
import secrets
import time

from agent.migration.phases import FINAL, MigrationPhase, PhaseTracker
from agent.migration.stats import MigrationStats

MAX_FINISHED_JOBS = 1000


class Job:
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

    def summary(self) -> dict:
        s = self.stats
        return {
            "id": self.id,
            "vm": self.vm,
            "direction": self.direction,
            "source": self.source,
            "destination": self.destination,
            "state": self.phase.value,
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
            "guest_rate_before_pps": s.guest_rate_before_pps,
            "guest_rate_during_pps": s.guest_rate_during_pps,
            "writes_at_pause": s.writes_at_pause,
            "writes_after_resume": s.writes_after_resume,
            "phases": {k: round(v, 1) for k, v in phases.items()},
            "rounds": s.round_log,
            "queued_at": self.queued_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class JobTable:
    """This host's jobs; ``observers`` get ``job_started(job)`` and ``job_finished(job)``."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self.observers: list = []

    def _finished(self, job: Job) -> None:
        for o in self.observers:
            o.job_finished(job)

    def add(self, job: Job) -> Job:
        self._jobs[job.id] = job
        job.on_finish = self._finished
        for o in self.observers:
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
