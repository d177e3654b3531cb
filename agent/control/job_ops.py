"""Control handlers for jobs: jobs, job.show, job.wait, job.set, cancel.

``jobs`` lists this agent's jobs, the running ones and the finished ones
from the history (``history.py``: they survive a restart), filtered by
``vm``, ``state`` and ``since`` (Unix time: jobs running, or ended at or
after it); ``running`` lists only the jobs under way (progress displays). ``job.show`` finds a finished job in the history too.
``job.set`` tunes a running outbound migration (``max_bandwidth_mibps``,
``downtime_ms``; the driver's ``tune``). ``cancel`` takes a job id or the
name of a VM with an outbound migration under way.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from agent.control.history import history_of, job_report, matches
from agent.errors import AgentError
from agent.migration.jobs import Job
from agent.migration.phases import MigrationPhase, is_cancellable

if TYPE_CHECKING:
    from agent.daemon.agent import Agent


def _opt_int(args: dict, key: str, minimum: int) -> int | None:
    v = args.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise AgentError(f"{key}: expected an integer, got {v!r}")
    if v < minimum:
        raise AgentError(f"{key}: must be >= {minimum}, got {v}")
    return v


class JobOps:
    def __init__(self, agent: "Agent") -> None:
        self.host = agent.host

    def handlers(self) -> dict:
        return {"jobs": self.jobs, "job.show": self.show, "job.wait": self.wait, "job.set": self.set,
                "cancel": self.cancel}

    @property
    def history(self):
        return history_of(self.host.jobs.observers)

    def _job(self, job_id) -> Job:
        job = self.host.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise AgentError(f"no job {job_id!r} on {self.host.name}")
        return job

    async def jobs(self, args: dict):
        vm, state, since = args.get("vm"), args.get("state"), args.get("since")
        for key, v in (("vm", vm), ("state", state)):
            if v is not None and not isinstance(v, str):
                raise AgentError(f"{key}: expected a string, got {v!r}")
        if since is not None and (isinstance(since, bool) or not isinstance(since, (int, float))):
            raise AgentError(f"since: expected a Unix time, got {since!r}")
        if args.get("running"):                  # progress displays: the jobs under way, nothing else
            return [r for r in (j.summary() for j in self.host.jobs.running()) if matches(r, vm, state, since)]
        records = {r["id"]: r for r in (self.history.records() if self.history else [])}
        # a finished job: its summary with what only the report has (downtime, verified, ...)
        live = [{**records.get(j.id, {}), **j.summary()} for j in self.host.jobs]
        ids = {r["id"] for r in live}
        past = [r for r in records.values() if r["id"] not in ids]
        rows = sorted(past + live, key=lambda r: r.get("queued_at") or 0)
        return [r for r in rows if matches(r, vm, state, since)]

    async def show(self, args: dict):
        job = self.host.jobs.get(args.get("id")) if isinstance(args.get("id"), str) else None
        if job is not None:
            return job_report(job)
        rec = self.history.get(args.get("id")) if self.history and isinstance(args.get("id"), str) else None
        if rec is None:
            raise AgentError(f"no job {args.get('id')!r} on {self.host.name}")
        return rec

    async def wait(self, args: dict):
        job = self.host.jobs.get(args.get("id")) if isinstance(args.get("id"), str) else None
        if job is None:
            return await self.show(args)          # finished before this agent started: its record
        await job.done.wait()
        return job_report(job)

    async def set(self, args: dict):
        """Tune a running outbound migration: the bandwidth cap (MiB/s, 0 = none) and the downtime target."""
        job = self._job(args.get("id"))
        bw = _opt_int(args, "max_bandwidth_mibps", 0)
        downtime = _opt_int(args, "downtime_ms", 1)
        if bw is None and downtime is None:
            raise AgentError("job.set: nothing to set (max_bandwidth_mibps, downtime_ms)")
        if getattr(job, "kind", "live") != "live":
            raise AgentError(f"job {job.id} is a {job.kind} job; job set tunes live migrations")
        if job.direction != "outbound":
            raise AgentError(f"job {job.id} is inbound; set it on its source ({job.source})")
        if job.done.is_set():
            raise AgentError(f"job {job.id} already ended ({job.phase.value})")
        driver = getattr(job, "driver", None)
        if job.phase is MigrationPhase.QUEUED or driver is None:
            raise AgentError(f"job {job.id} has not started yet ({job.phase.value}); "
                             f"set it once it runs, or cancel it and migrate again with the new options")
        if not is_cancellable(job.phase):
            raise AgentError(f"job {job.id} is in {job.phase.value}; its transfer is over")
        tuned = driver.tune(max_bandwidth_mibps=bw, downtime_ms=downtime)
        return {"id": job.id, "vm": job.vm, "state": job.phase.value, **tuned}

    def _cancel_target(self, ident) -> Job:
        """The job named ``ident``, or the running outbound job of the VM named ``ident``."""
        if not isinstance(ident, str):
            raise AgentError(f"cancel: expected a job id or a VM name, got {ident!r}")
        job = self.host.jobs.get(ident)
        if job is not None:
            return job
        mine = [j for j in self.host.jobs.running() if j.vm == ident]
        out = [j for j in mine if j.direction == "outbound"]
        if out:
            return out[-1]
        if mine:
            raise AgentError(f"{ident} is arriving here (job {mine[-1].id}); cancel it on its source "
                             f"({mine[-1].source})")
        raise AgentError(f"no job and no migrating VM named {ident!r} on {self.host.name}")

    async def cancel(self, args: dict):
        job = self._cancel_target(args.get("id"))
        if job.direction != "outbound" or job.task is None:
            raise AgentError(f"job {job.id} is inbound; cancel it on its source ({job.source})")
        if job.done.is_set():
            raise AgentError(f"job {job.id} already ended ({job.phase.value})")
        if not is_cancellable(job.phase):
            raise AgentError(f"job {job.id} is in {job.phase.value}; it can no longer be cancelled")
        job.task.cancel()
        await job.done.wait()
        return job_report(job)
