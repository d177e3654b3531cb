"""Control handlers for storage moves: ``storage.move``, and ``cancel`` of a storage job.

``storage.move``: ``vm``; ``dest`` (a directory) with an optional ``only``
(disk names, a list or "a,b"), or ``map`` (["NAME=PATH", ...] or
{NAME: PATH}); ``overwrite`` (replace existing targets), ``max_bandwidth_mibps``
(copier cap, 0 = none), ``priority`` (queue order), ``wait`` (answer with
the report at the end). Everything is checked before a job exists
(agent.migration.storage.plan_move): each refusal names the disk and the
path. The VM is owned by the job from the queue on (no live migration,
pause, delete or second move of it meanwhile).

``cancel`` is registered over the job handlers' one: a storage job (by
its id, or the name of a VM whose storage move runs) is cancelled here (any
phase before ``pivoting``: the VM stays on its source files), anything
else is handed to the original handler.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from agent.control.migrate_ops import _int_arg
from agent.errors import AgentError, VmError
from agent.migration.jobs import StorageJob
from agent.migration.storage import MoveRefused, new_job_id, parse_map, plan_move, start_move
from agent.observe.logs import get_logger

if TYPE_CHECKING:
    from agent.daemon.agent import Agent

log = get_logger("livemig.control.storage")


def _int(args: dict, key: str, minimum: int | None, default: int) -> int:
    value = _int_arg(args, key, minimum)          # the same checks as migrate's options
    return default if value is None else value


def _bool(args: dict, key: str) -> bool:
    value = args.get(key, False)
    if not isinstance(value, bool):
        raise AgentError(f"{key}: expected true/false, got {value!r}")
    return value


def _names(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise AgentError(f"only: expected disk names (e.g. root,data), got {value!r}")
    return value


class StorageOps:
    def __init__(self, agent: "Agent", other_cancel=None) -> None:
        self.agent = agent
        self.host = agent.host
        self._other_cancel = other_cancel

    def handlers(self) -> dict:
        return {"storage.move": self.move, "cancel": self.cancel}

    async def move(self, args: dict):
        if self.agent.shutting_down:
            raise AgentError(f"agent shutting down: {self.host.name} starts no new storage move")
        vm = self.host.registry.get(args.get("vm"))
        if vm.storage_move is not None:
            raise VmError(f"{vm.name} already has a storage move (job {vm.storage_move})")
        if vm.migrating is not None:
            raise VmError(f"{vm.name} is migrating (job {vm.migrating}); move its storage when that job has ended")
        if vm.record.state == "incoming":
            raise VmError(f"{vm.name} is still arriving here")
        if vm.broken:
            raise VmError(f"{vm.name} is broken ({vm.record.broken_reason})")
        if vm.state() not in ("running", "paused"):
            raise VmError(f"{vm.name} is {vm.state()}; start it first: its guest performs the switch")
        dest = args.get("dest")
        if dest is not None and (not isinstance(dest, str) or not dest):
            raise AgentError(f"dest: expected a directory, got {dest!r}")
        only = _names(args.get("only"))
        overwrite = _bool(args, "overwrite")
        wait = _bool(args, "wait")
        mibps = _int(args, "max_bandwidth_mibps", 0, 0)
        priority = _int(args, "priority", None, 0)
        job_id = new_job_id()
        try:
            mapping = parse_map(args.get("map"))
            plans = plan_move(self.host.registry, vm, dest=dest, only=only, mapping=mapping,
                              overwrite=overwrite, job_id=job_id)
        except MoveRefused as exc:
            raise AgentError(f"storage move of {vm.name} refused: {exc}") from exc
        destination = dest if dest is not None else ", ".join(f"{p.name}={p.dst}" for p in plans)
        job = start_move(self.agent, vm, plans, job_id, overwrite=overwrite, bandwidth_bps=mibps * 2**20,
                         priority=priority, destination=destination)
        if wait:
            await job.done.wait()
            return job.report()
        return job.summary()

    async def cancel(self, args: dict):
        ident = args.get("id")
        job = self.host.jobs.get(ident) if isinstance(ident, str) else None
        if job is None and isinstance(ident, str):         # a VM name: its running storage move
            job = next((j for j in self.host.jobs.running() if isinstance(j, StorageJob) and j.vm == ident), None)
        if not isinstance(job, StorageJob):
            if self._other_cancel is None:
                raise AgentError(f"no job {args.get('id')!r} on {self.host.name}")
            return await self._other_cancel(args)
        if job.done.is_set():
            raise AgentError(f"job {job.id} already ended ({job.phase.value})")
        if not job.cancellable():
            raise AgentError(f"job {job.id} is in {job.phase.value}; it can no longer be cancelled "
                             f"(the guest is being switched to the verified copies)")
        log.info("storage_move_cancel_requested", job=job.id, vm=job.vm, phase=job.phase.value)
        job.task.cancel()
        await job.done.wait()
        return job.report()
