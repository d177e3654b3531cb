"""Control handlers that start migrations: migrate, drain, undrain.

Per-migration options are checked here, before any job exists:
``downtime_ms`` int >= 1, ``max_bandwidth_mibps`` int >= 0, ``verify``
"incremental" | "full", ``streams`` int 1..8 (data connections offered),
``priority`` int (each may be absent or null).
While the agent shuts down, no new migration is started.

``migrate.check`` (``migrate --dry-run``) checks the VM here and asks the
destination's admission (``precheck``) without creating anything on either
side. ``migrate`` with ``check`` runs the same check first and refuses a
migration the destination would refuse (``migrate`` without --wait fails
fast instead of exiting 0 and failing later); a destination that is only
busy (no free slot now) is not a refusal: the job queues.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from protocol import MAX_STREAMS, ErrorCode

from agent.control.history import job_report
from agent.daemon.config import parse_hostport
from agent.daemon.vm import Vm
from agent.errors import AgentError, VmError
from agent.migration.jobs import Job
from agent.migration.outbound import run_outbound
from agent.migration.phases import is_cancellable
from agent.migration.precheck import precheck
from agent.observe.logs import get_logger

if TYPE_CHECKING:
    from agent.daemon.agent import Agent

log = get_logger("livemig.control.migrate")

VERIFY_MODES = ("incremental", "full")


def _int_arg(args: dict, key: str, minimum: int | None) -> int | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise AgentError(f"{key}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise AgentError(f"{key}: must be >= {minimum}, got {value}")
    return value


def migration_options(args: dict) -> dict:
    """The validated per-migration options of a migrate/drain request."""
    verify = args.get("verify")
    if verify is not None and verify not in VERIFY_MODES:
        raise AgentError(f"verify: {' or '.join(VERIFY_MODES)}, got {verify!r}")
    streams = _int_arg(args, "streams", 1)
    if streams is not None and streams > MAX_STREAMS:
        raise AgentError(f"streams: 1..{MAX_STREAMS}, got {streams}")
    return {
        "streams": streams,
        "downtime_ms": _int_arg(args, "downtime_ms", 1),
        "max_bandwidth_mibps": _int_arg(args, "max_bandwidth_mibps", 0),
        "verify": verify,
        "priority": _int_arg(args, "priority", None) or 0,
        "allow_network_change": _bool_arg(args, "allow_network_change"),
        **storage_options(args),
    }


def _bool_arg(args: dict, key: str) -> bool:
    value = args.get(key, False)
    if not isinstance(value, bool):
        raise AgentError(f"{key}: expected true/false, got {value!r}")
    return value


def storage_options(args: dict) -> dict:
    """``storage`` auto|shared|copy, ``storage_dest`` (a directory on the
    destination), ``map`` {disk name: path on the destination} or ["NAME=PATH"]."""
    from agent.migration.disk_section import MODES

    storage = args.get("storage") or "auto"
    if storage not in MODES:
        raise AgentError(f"storage: {' | '.join(MODES)}, got {storage!r}")
    dest = args.get("storage_dest")
    if dest is not None and (not isinstance(dest, str) or not dest.startswith("/") or "\0" in dest):
        raise AgentError(f"storage_dest: an absolute directory on the destination, got {dest!r}")
    raw = args.get("map") or {}
    if isinstance(raw, list):
        pairs = {}
        for item in raw:
            name, sep, path = item.partition("=") if isinstance(item, str) else ("", "", "")
            if not sep or not name:
                raise AgentError(f"map: expected NAME=PATH, got {item!r}")
            pairs[name] = path
        raw = pairs
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.startswith("/")
                                            and "\0" not in v for k, v in raw.items()):
        raise AgentError(f"map: NAME=ABSOLUTE_PATH (a path on the destination), got {raw!r}")
    if raw and storage == "shared":
        raise AgentError("map and storage_dest place copies; a shared migration copies nothing")
    if dest and storage == "shared":
        raise AgentError("map and storage_dest place copies; a shared migration copies nothing")
    return {"storage": storage, "storage_dest": dest, "map": raw}


def _section_options(opts: dict) -> dict:
    return {k: opts[k] for k in ("storage", "storage_dest", "map", "allow_network_change")}


def storage_report(job: Job) -> dict:
    """storage_mode and per-disk bytes_copied/verified of a VM with disks (the disk section's figures)."""
    st = getattr(job, "storage", None)
    if not st:
        return {}
    return {"storage_mode": st["storage_mode"],
            "disks": [{**d, "verified": bool(job.verified)} for d in st["disks"]]}


def _targets(op: str, value) -> list[str]:
    targets = [value] if isinstance(value, str) else value
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AgentError(f"{op} needs at least one target (--to HOST:PORT)")
    for t in targets:
        parse_hostport(t)
    return targets


def refusal_line(vm: str, answer: dict) -> str:
    """One line for a precheck that said no: who refused what and why (or that nobody answered)."""
    dest, reason = answer["destination"], answer["reason"] or "refused"
    if answer.get("agent") is None:
        return f"cannot migrate {vm}: {reason}"
    reason = reason.removeprefix(f"{dest} refused: ")
    return f"{dest} (agent {answer['agent']}) refuses {vm}: {reason}"


class MigrateOps:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.host = agent.host

    def handlers(self) -> dict:
        return {"migrate": self.migrate, "migrate.check": self.check, "drain": self.drain,
                "undrain": self.undrain}

    def _refuse_if_stopping(self) -> None:
        if self.agent.shutting_down:
            raise AgentError(f"agent shutting down: {self.host.name} starts no new migration")

    def _check_movable(self, vm: Vm, opts: dict | None = None) -> None:
        names = {d["name"] for d in vm.record.disks}
        unknown = sorted(set((opts or {}).get("map") or {}) - names)
        if unknown:
            raise VmError(f"{vm.name} has no disk {', '.join(unknown)} (its disks: {', '.join(sorted(names)) or 'none'})")
        if vm.storage_move is not None:
            raise VmError(f"{vm.name} has a storage move under way (job {vm.storage_move}); "
                          f"migrate it when that job has ended")
        if vm.migrating is not None:
            raise VmError(f"{vm.name} is already migrating (job {vm.migrating})")
        if vm.record.state == "incoming":
            raise VmError(f"{vm.name} is still arriving here")
        if vm.state() != "running":
            raise VmError(f"{vm.name} is {vm.state()}; only a running VM can be live-migrated")

    def _start_outbound(self, vm: Vm, targets: list[str], opts: dict) -> Job:
        self._check_movable(vm, opts)
        h = self.host
        job = Job(vm=vm.name, source=h.listen_addr or h.name,
                  destination=targets[0] if len(targets) == 1 else "", direction="outbound")
        job.targets = list(targets)
        job.priority = opts["priority"]
        job.streams = opts["streams"]            # None: the agent's migration.streams
        h.jobs.add(job)
        vm.migrating = job.id
        coro = run_outbound(h, job, vm, downtime_ms=opts["downtime_ms"],
                            max_bandwidth_mibps=opts["max_bandwidth_mibps"], verify=opts["verify"],
                            options=_section_options(opts))
        job.task = self.agent.jobs.spawn(coro, f"outbound:{job.id}:{vm.name}",
                                         cancellable=lambda: is_cancellable(job.phase))
        log.info("migration_queued", job=job.id, vm=vm.name, targets=targets, priority=job.priority,
                 verify=opts["verify"])
        return job

    async def check(self, args: dict):
        """The dry run: would this VM be admitted by the destination now? Creates nothing."""
        opts = migration_options(args)
        target = _targets("migrate", args.get("to"))[0]
        vm = self.host.registry.get(args.get("vm"))
        self._check_movable(vm)
        answer = await precheck(self.host, vm, target, opts["verify"], options=_section_options(opts))
        return {"vm": vm.name, "memory_bytes": vm.record.memory_bytes, **answer,
                "message": None if answer["ok"] else refusal_line(vm.name, answer)}

    async def migrate(self, args: dict):
        self._refuse_if_stopping()
        opts = migration_options(args)
        targets = _targets("migrate", args.get("to"))
        vm = self.host.registry.get(args.get("vm"))
        if args.get("check"):
            self._check_movable(vm)
            answer = await precheck(self.host, vm, targets[0], opts["verify"], options=_section_options(opts))
            if not answer["ok"] and answer["code"] != ErrorCode.BUSY:
                raise AgentError(refusal_line(vm.name, answer))
            self._refuse_if_stopping()
        job = self._start_outbound(vm, targets[:1], opts)
        if args.get("wait"):
            await job.done.wait()
            return {**job_report(job), **storage_report(job)}
        return job.summary()

    async def drain(self, args: dict):
        """Maintenance: accept no inbound VMs, move every VM to the targets."""
        self._refuse_if_stopping()
        opts = migration_options(args)
        targets = _targets("drain", args.get("to") or [])
        h = self.host
        h.maintenance = True
        t0 = time.time()
        jobs = []
        for vm in sorted(h.registry, key=lambda v: -v.record.memory_bytes):   # big ones first: best fit
            # VMs with disks move too (storage auto: shared if the target sees the files, else copied)
            if vm.migrating is None and vm.record.state != "incoming" and vm.state() == "running":
                jobs.append(self._start_outbound(vm, targets, opts))
        log.info("drain_started", vms=len(jobs), targets=targets)
        if not args.get("wait"):
            return {"maintenance": True, "jobs": [j.summary() for j in jobs]}
        await asyncio.gather(*(j.done.wait() for j in jobs))
        return self._drain_result(jobs, t0)

    def _drain_result(self, jobs: list[Job], t0: float) -> dict:
        reports = [j.report() for j in jobs]
        left = [vm.name for vm in self.host.registry]
        keys = ("id", "vm", "destination", "status", "error", "total_ms", "downtime_ms", "queued_at",
                "started_at", "finished_at", "bytes_sent", "verified")
        ok = all(r["status"] == "completed" for r in reports) and not left
        result = {
            "maintenance": True,
            "status": "completed" if ok else "incomplete",
            "drain_ms": round((time.time() - t0) * 1000.0, 1),
            "vms": [{**{k: r[k] for k in keys}, **storage_report(j)} for j, r in zip(jobs, reports)],
            "vms_left": left,
        }
        log.info("drain_finished", status=result["status"], drain_ms=result["drain_ms"], vms_left=len(left))
        return result

    async def undrain(self, args: dict):
        self.host.maintenance = False
        log.info("maintenance_ended")
        return {"maintenance": False}
