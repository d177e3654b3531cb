"""Agent: composes the registry, the endpoints and the migration drivers.

Lifecycle (uvicorn order): ``start()`` adopts VMs left from a previous run,
binds the migration endpoint and the control socket, and returns the bound
migration address; ``serve()`` waits for the stop event; ``shutdown(grace)``
stops accepting, lets running migrations finish or roll back within
``grace``, cancels the rest (which rolls them back), and closes the
endpoints.

VMs outlive the agent (libvirt's choice, ``KillMode=process``): guests run
in their own sessions and the next start re-adopts them.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import psutil

from memstore import DirtyMap, GuestRam, SegmentError, parse_size

from agent.observe import sdnotify
from agent.daemon.config import AgentConfig, NAME_RE, parse_hostport
from agent.control.server import ControlServer
from agent.net.endpoint import MigrationEndpoint
from agent.errors import AgentError, VmError
from agent.daemon.host import Host
from agent.migration.jobs import Job
from agent.migration.heat import HEAT_PERIOD_S
from agent.observe.logs import get_logger
from agent.observe.metrics import AgentMetrics, MetricsServer, host_gauges
from agent.migration.phases import MigrationPhase, is_cancellable
from agent.daemon.registry import VmRegistry
from agent.migration.outbound import run_outbound
from agent.daemon.vm import Vm, VmRecord, check_workload

log = get_logger("livemig.agent")

def _rss_anon() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _fill_random(ram: memoryview, chunk_bytes: int = 4 * 2**20) -> None:
    """Fill guest RAM with incompressible bytes (a VM that has used all its memory)."""
    for off in range(0, len(ram), chunk_bytes):
        n = min(chunk_bytes, len(ram) - off)
        ram[off:off + n] = os.urandom(n)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        a = cfg.agent
        os.makedirs(a.data_dir, mode=0o700, exist_ok=True)
        registry = VmRegistry(a.data_dir, a.shm_prefix, a.name)
        self.host = Host(cfg=cfg, registry=registry, auth_key=cfg.auth_key())
        self.endpoint = MigrationEndpoint(self.host)
        self.control = ControlServer(a.control, a.control_mode, self._handlers())
        self.stop_event = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.started_at = time.time()
        self.metrics_addr: str | None = None

    # ---- lifecycle -------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        log.info("config_loaded", **self.cfg.as_dict())
        adopted = self.host.registry.adopt(self.host.guest_log_dir)
        log.info("vms_adopted", **adopted)
        addr = await self.endpoint.start()
        self.host.listen_addr = f"{addr[0]}:{addr[1]}"
        await self.control.start()
        log.info("listening", migration=self.host.listen_addr, control=self.cfg.agent.control, pid=os.getpid())
        return addr

    async def serve(self) -> None:
        heat = asyncio.get_running_loop().create_task(self._track_heat())
        try:
            await self.stop_event.wait()
        finally:
            heat.cancel()

    async def _track_heat(self) -> None:
        """Sample each idle VM's dirty map once per period (see heat.py)."""
        while True:
            await asyncio.sleep(HEAT_PERIOD_S)
            for vm in self.host.registry:
                # A migration owns the dirty map from the moment it is queued.
                if vm.migrating is None and vm.record.state == "running" and not vm.ram.closed:
                    vm.heat.update(DirtyMap(vm.ram.dirty).collect())

    def request_stop(self) -> None:
        self.stop_event.set()

    async def shutdown(self, grace_s: float = 10.0) -> None:
        log.info("shutting_down", running_jobs=len(self.host.jobs.running()))
        self.endpoint.close()
        outbound = [t for t in self.tasks if not t.done()]
        if outbound:
            _, pending = await asyncio.wait(outbound, timeout=grace_s)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=10.0)
        await self.endpoint.shutdown(grace_s=1.0)
        await self.control.close()
        for vm in self.host.registry:
            try:
                vm.ram.close()
            except SegmentError as exc:       # a view still held by a cancelled task: harmless at exit
                log.warning("segment_close_deferred", vm=vm.name, error=str(exc))
        log.info("stopped", vms_left_running=len(self.host.registry))

    def _track(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_crashed", error=repr(task.exception()))

    # ---- control handlers ----------------------------------------------
    def _handlers(self):
        return {
            "ping": self.op_ping,
            "status": self.op_status,
            "vm.create": self.op_vm_create,
            "vm.list": self.op_vm_list,
            "vm.show": self.op_vm_show,
            "vm.delete": self.op_vm_delete,
            "migrate": self.op_migrate,
            "jobs": self.op_jobs,
            "job.show": self.op_job_show,
            "job.wait": self.op_job_wait,
            "cancel": self.op_cancel,
            "drain": self.op_drain,
            "undrain": self.op_undrain,
            "config.set": self.op_config_set,
        }

    async def op_ping(self, args: dict):
        return {"agent": self.host.name, "pid": os.getpid()}

    async def op_status(self, args: dict):
        h = self.host
        return {
            "agent": h.name,
            "pid": os.getpid(),
            "listen": h.listen_addr,
            "metrics": self.metrics_addr,
            "control": self.cfg.agent.control,
            "vms": len(h.registry),
            "max_live_migrations": h.slots.limit,
            "max_storage_migrations": h.storage_limit,
            "live_migrations_running": h.slots.in_use,
            "live_migrations_queued": len([j for j in h.jobs.running() if j.phase is MigrationPhase.QUEUED]),
            "memory_available_bytes": h.memory_available(),
            "maintenance": h.maintenance,
            "uptime_s": round(time.time() - self.started_at, 1),
            "rss_bytes": psutil.Process().memory_info().rss,
            "rss_anon_bytes": _rss_anon(),      # RSS without mapped guest memory (shm pages count in rss)
        }

    async def op_vm_create(self, args: dict):
        name = args["name"]
        if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
            raise VmError(f"bad VM name {name!r}: use 1-64 of A-Z a-z 0-9 _ -")
        memory = args.get("memory", "256M")
        try:
            memory_bytes = parse_size(memory) if isinstance(memory, str) else int(memory)
        except ValueError as exc:
            raise VmError(str(exc)) from exc
        workload = args.get("workload", "idle")
        check_workload(workload, memory_bytes)
        reg = self.host.registry
        if name in reg:
            raise VmError(f"a VM named {name!r} already exists on {self.host.name}")
        available = self.host.memory_available()
        if memory_bytes > available:
            raise VmError(f"not enough memory on {self.host.name}: VM needs {memory_bytes / 2**20:.0f} MiB, "
                          f"{available / 2**20:.0f} MiB available")
        prefill = args.get("prefill", "none")
        if prefill not in ("none", "random"):
            raise VmError(f"prefill: 'none' or 'random', got {prefill!r}")
        vm_id = Vm.new_id()
        seg = reg.segment_name(name, vm_id)
        ram = GuestRam.create(seg, memory_bytes)
        vm = None
        try:
            if prefill == "random":
                await asyncio.to_thread(_fill_random, ram.ram)
            ram.ctl.workload = workload
            ram.ctl.seed = int.from_bytes(os.urandom(8), "little") >> 1
            rec = VmRecord(name=name, id=vm_id, memory_bytes=memory_bytes, workload=workload, segment=seg)
            vm = Vm(rec, ram)
            reg.add(vm)
            vm.start_guest(self.host.guest_log(name))
            reg.save(vm)
            await vm.wait_running(self.cfg.migration.guest_ack_timeout_s)
        except BaseException:
            if vm is not None:
                await vm.stop_guest(1.0)
                reg.remove(vm)
            ram.close()
            ram.unlink()
            raise
        log.info("vm_created", vm=name, memory_bytes=memory_bytes, workload=workload, segment=seg)
        return vm.info()

    async def op_vm_list(self, args: dict):
        return [vm.info() for vm in self.host.registry]

    async def op_vm_show(self, args: dict):
        return self.host.registry.get(args["name"]).info()

    async def op_vm_delete(self, args: dict):
        vm = self.host.registry.get(args["name"])
        if vm.migrating is not None:
            raise VmError(f"{vm.name} is migrating (job {vm.migrating}); cancel it first")
        if vm.record.state == "incoming":
            raise VmError(f"{vm.name} is arriving by migration; it can be deleted once it runs here")
        await vm.stop_guest(self.cfg.migration.guest_ack_timeout_s)
        vm.release()
        self.host.registry.remove(vm)
        log.info("vm_deleted", vm=vm.name)
        return {"deleted": vm.name}

    def _start_outbound(self, vm: Vm, targets: list[str], args: dict) -> Job:
        for t in targets:
            parse_hostport(t)
        if vm.migrating is not None:
            raise VmError(f"{vm.name} is already migrating (job {vm.migrating})")
        if vm.record.state == "incoming":
            raise VmError(f"{vm.name} is still arriving here")
        if vm.state() != "running":
            raise VmError(f"{vm.name} is {vm.state()}; only a running VM can be live-migrated")
        job = Job(vm=vm.name, source=self.host.listen_addr or self.host.name,
                  destination=targets[0] if len(targets) == 1 else "", direction="outbound")
        job.targets = list(targets)
        job.priority = int(args.get("priority") or 0)
        self.host.jobs.add(job)
        vm.migrating = job.id
        job.task = self._track(run_outbound(self.host, job, vm, downtime_ms=args.get("downtime_ms"),
                                            max_bandwidth_mibps=args.get("max_bandwidth_mibps")))
        log.info("migration_queued", job=job.id, vm=vm.name, targets=targets, priority=job.priority)
        return job

    async def op_migrate(self, args: dict):
        vm = self.host.registry.get(args["vm"])
        job = self._start_outbound(vm, [args["to"]], args)
        if args.get("wait"):
            await job.done.wait()
            return job.report()
        return job.summary()

    async def op_drain(self, args: dict):
        """Maintenance: accept no inbound VMs, move every VM to the targets."""
        targets = args.get("to") or []
        if isinstance(targets, str):
            targets = [targets]
        if not targets:
            raise AgentError("drain needs at least one target (--to HOST:PORT)")
        for t in targets:
            parse_hostport(t)
        h = self.host
        h.maintenance = True
        t0 = time.time()
        jobs = []
        for vm in sorted(h.registry, key=lambda v: -v.record.memory_bytes):   # big ones first: best fit
            if vm.migrating is None and vm.record.state != "incoming" and vm.state() == "running":
                jobs.append(self._start_outbound(vm, targets, args))
        log.info("drain_started", vms=len(jobs), targets=targets)
        if not args.get("wait"):
            return {"maintenance": True, "jobs": [j.summary() for j in jobs]}
        await asyncio.gather(*(j.done.wait() for j in jobs))
        reports = [j.report() for j in jobs]
        left = [vm.name for vm in h.registry]
        result = {
            "maintenance": True,
            "status": "completed" if all(r["status"] == "completed" for r in reports) and not left else "incomplete",
            "drain_ms": round((time.time() - t0) * 1000.0, 1),
            "vms": [{"id": r["id"], "vm": r["vm"], "destination": r["destination"], "status": r["status"], "error": r["error"],
                     "total_ms": r["total_ms"], "downtime_ms": r["downtime_ms"], "queued_at": r["queued_at"],
                     "started_at": r["started_at"], "finished_at": r["finished_at"],
                     "bytes_sent": r["bytes_sent"], "verified": r["verified"]} for r in reports],
            "vms_left": left,
        }
        log.info("drain_finished", status=result["status"], drain_ms=result["drain_ms"], vms_left=len(left))
        return result

    async def op_undrain(self, args: dict):
        self.host.maintenance = False
        log.info("maintenance_ended")
        return {"maintenance": False}

    async def op_jobs(self, args: dict):
        return [j.summary() for j in self.host.jobs]

    def _job(self, job_id: str) -> Job:
        job = self.host.jobs.get(job_id)
        if job is None:
            raise AgentError(f"no job {job_id!r} on {self.host.name}")
        return job

    async def op_job_show(self, args: dict):
        return self._job(args["id"]).report()

    async def op_job_wait(self, args: dict):
        job = self._job(args["id"])
        await job.done.wait()
        return job.report()

    async def op_cancel(self, args: dict):
        job = self._job(args["id"])
        if job.direction != "outbound" or job.task is None:
            raise AgentError(f"job {job.id} is inbound; cancel it on its source")
        if job.done.is_set():
            raise AgentError(f"job {job.id} already ended ({job.phase.value})")
        if not is_cancellable(job.phase):
            raise AgentError(f"job {job.id} is in {job.phase.value}; it can no longer be cancelled")
        job.task.cancel()
        await job.done.wait()
        return job.report()

    async def op_config_set(self, args: dict):
        key, value = args["key"], args["value"]
        key = key.replace("limits.", "").replace("-", "_")
        if key in ("max_live_migrations", "max_storage_migrations"):
            try:
                n = int(value)
            except ValueError:
                raise AgentError(f"{key}: expected an integer, got {value!r}") from None
            if not 1 <= n <= 1024:
                raise AgentError(f"{key}: 1..1024")
            if key == "max_live_migrations":
                self.host.slots.set_limit(n)
                self.host.pairs.wake_all()
            else:
                self.host.storage_limit = n
            log.info("limit_changed", key=key, value=n)
            return {key: n}
        raise AgentError(f"unknown or read-only setting {key!r}")


GIL_SWITCH_INTERVAL_S = 0.0005


class _JobMetrics:
    """Feeds every job's start and end, both directions, to the metrics."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def job_started(self, job: Job) -> None:
        self.metrics.migration_started(job.direction)

    def job_finished(self, job: Job) -> None:
        r = job.report()
        self.metrics.migration_finished(job.direction, r["status"], r)


async def run_agent(cfg: AgentConfig, grace_s: float = 10.0, metrics: str | None = None) -> int:
    # The data plane's helper threads (digests, pre-fault) take the GIL in short
    # bursts; with the default 5 ms switch interval the event loop, which moves
    # the pages, can wait that long for it each time.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    agent = Agent(cfg)
    agent.metrics = AgentMetrics(gauges=lambda: host_gauges(agent.host))
    agent.host.jobs.observers.append(_JobMetrics(agent.metrics))
    metrics_server = None
    if metrics:
        mhost, mport = parse_hostport(metrics)
        metrics_server = MetricsServer(agent.metrics, mhost, mport)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("signal_received", action="graceful shutdown")
            agent.request_stop()
        else:
            log.warning("signal_received", action="forced exit")
            os._exit(1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await agent.start()
        if metrics_server is not None:
            maddr = await metrics_server.start()
            agent.metrics_addr = f"{maddr[0]}:{maddr[1]}"
            log.info("metrics_listening", address=agent.metrics_addr)
    except (AgentError, OSError) as exc:
        log.error("start_failed", error=str(exc))
        await agent.control.close()
        return 1
    # systemd (Type=notify): ready only once both endpoints accept connections.
    sdnotify.ready()
    sdnotify.status(f"{agent.host.name}: migration {agent.host.listen_addr}, control {cfg.agent.control}")
    interval = sdnotify.watchdog_interval_s()
    watchdog = asyncio.create_task(sdnotify.watchdog_loop(interval)) if interval else None
    await agent.serve()
    sdnotify.stopping()
    await agent.shutdown(grace_s)
    if watchdog is not None:
        watchdog.cancel()
    if metrics_server is not None:
        await metrics_server.close()
    return 0
