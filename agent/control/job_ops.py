"""Control handlers for jobs: jobs, job.show, job.wait, cancel."""
from __future__ import annotations

from typing import TYPE_CHECKING

from agent.errors import AgentError
from agent.migration.jobs import Job
from agent.migration.phases import is_cancellable

if TYPE_CHECKING:
    from agent.daemon.agent import Agent


class JobOps:
    def __init__(self, agent: "Agent") -> None:
        self.host = agent.host

    def handlers(self) -> dict:
        return {"jobs": self.jobs, "job.show": self.show, "job.wait": self.wait, "cancel": self.cancel}

    def _job(self, job_id) -> Job:
        job = self.host.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise AgentError(f"no job {job_id!r} on {self.host.name}")
        return job

    async def jobs(self, args: dict):
        return [j.summary() for j in self.host.jobs]

    async def show(self, args: dict):
        return self._job(args.get("id")).report()

    async def wait(self, args: dict):
        job = self._job(args.get("id"))
        await job.done.wait()
        return job.report()

    async def cancel(self, args: dict):
        job = self._job(args.get("id"))
        if job.direction != "outbound" or job.task is None:
            raise AgentError(f"job {job.id} is inbound; cancel it on its source")
        if job.done.is_set():
            raise AgentError(f"job {job.id} already ended ({job.phase.value})")
        if not is_cancellable(job.phase):
            raise AgentError(f"job {job.id} is in {job.phase.value}; it can no longer be cancelled")
        job.task.cancel()
        await job.done.wait()
        return job.report()
