"""Agent: composes the registry, the endpoints, the supervisor and the control handlers.

Lifecycle (uvicorn order):

- ``Agent(cfg)`` first takes the instance locks (data dir, identity,
  control socket: ``host.InstanceLock``); a second agent of the same kind
  stops there, having touched nothing.
- ``start()`` binds the migration endpoint and the control socket (not yet
  accepting), adopts the VMs left from a previous run, sweeps the segments
  its journal proves are its orphans, finishes or undoes the storage moves
  a killed agent left (their manifests), then accepts on both, starts the
  metrics server, heat tracking, the guest supervisor, the recovery of VMs
  paused by an unresolved outbound switchover, and tells systemd it is ready.
- ``serve()`` waits for the stop event.
- ``shutdown(grace)`` refuses new migrations, gives outbound and inbound
  migrations the same grace, cancels what may still be cancelled (a
  rollback or a switchover past the point of no return is waited for),
  then closes the endpoints and releases the locks.

VMs outlive the agent (libvirt's choice, ``KillMode=process``): guests run
in their own sessions and the next start re-adopts them. While the agent
runs, a guest that dies is restarted from its memory (``GuestSupervisor``).
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

from memstore import Cmd, DirtyMap, GuestError, SegmentError

from agent.control.history import JobHistory
from agent.control.job_ops import JobOps
from agent.control.migrate_ops import MigrateOps
from agent.control.server import ControlServer
from agent.control.status_ops import StatusOps
from agent.control.storage_ops import StorageOps
from agent.control.vm_ops import VmOps
from agent.daemon.config import AgentConfig, parse_hostport
from agent.daemon.host import Host, InstanceLock
from agent.daemon.registry import VmRegistry
from agent.daemon.tasks import TaskSet
from agent.daemon.vm import Vm
from agent.errors import AgentError, VmError
from agent.migration.heat import HEAT_PERIOD_S
from agent.migration.jobs import Job
from agent.migration.storage import recover_moves
from agent.migration.disk_section import recover_incoming
from agent.net.endpoint import MigrationEndpoint
from agent.observe import sdnotify
from agent.observe.logs import get_logger
from agent.observe.metrics import AgentMetrics, MetricsServer, failure_reason, host_gauges

log = get_logger("livemig.agent")

SUPERVISE_PERIOD_S = 0.2
RESTART_BACKOFF_MAX_S = 30.0
GIL_SWITCH_INTERVAL_S = 0.0005


class _JobMetrics:
    """Feeds every job's start and end, both directions, to the metrics."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def job_started(self, job: Job) -> None:
        self.metrics.migration_started(job.direction)

    def job_finished(self, job: Job) -> None:
        r = job.report()
        self.metrics.migration_finished(job.direction, r["status"], r,
                                        reason=failure_reason(job.error, job.verify_failed))


class GuestSupervisor:
    """Every SUPERVISE_PERIOD_S: a wanted guest that died or stopped its heartbeat
    is reported to the VM's ``on_guest_lost`` callbacks (once per death), or,
    when none is registered, restarted from its memory and vCPU state."""

    def __init__(self, host: Host, tasks: TaskSet) -> None:
        self.host = host
        self.tasks = tasks
        self._failures: dict[str, int] = {}
        self._next_try: dict[str, float] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_PERIOD_S)
            for vm in self.host.registry:
                try:
                    self.check(vm)
                except (SegmentError, VmError, OSError) as exc:
                    log.warning("supervise_failed", vm=vm.name, error=str(exc))

    def lost_reason(self, vm: Vm) -> str | None:
        """Why the guest counts as lost, or None if it is fine."""
        if not vm.guest_alive():
            code = vm.proc.poll() if vm.proc is not None else None
            return f"guest process {vm.record.guest_pid} exited" + (f" with {code}" if code is not None else "")
        age = vm.heartbeat_age_s()
        limit = self.host.cfg.migration.guest_heartbeat_timeout_s
        if age > limit:
            return f"guest process {vm.record.guest_pid} gave no heartbeat for {age:.1f} s (limit {limit} s)"
        return None

    def check(self, vm: Vm) -> None:
        if vm.broken or vm.ram.closed or vm.restarting or not vm.guest_wanted:
            return
        if vm.record.state == "incoming" and not vm.on_guest_lost:
            return                               # a shell: its migration driver decides
        reason = self.lost_reason(vm)
        if reason is None:
            return
        if vm.on_guest_lost:
            if vm.lost_pid != vm.record.guest_pid:
                vm.lost_pid = vm.record.guest_pid
                log.warning("guest_lost_reported", vm=vm.name, reason=reason, callbacks=len(vm.on_guest_lost))
                for cb in list(vm.on_guest_lost):
                    try:
                        cb(vm, reason)
                    except Exception:
                        log.exception("guest_lost_callback_failed", vm=vm.name)
            return
        if time.monotonic() < self._next_try.get(vm.name, 0.0):
            return
        vm.restarting = True                     # until the task runs: no second restart
        # Never cancelled (bounded by its timeouts): cut halfway, a guest would run with its pid unsaved.
        self.tasks.spawn(self._restart(vm, reason), f"restart-guest:{vm.name}", cancellable=lambda: False)

    async def _restart(self, vm: Vm, reason: str) -> None:
        run = vm.ctl.cmd == Cmd.RUN
        old_pid = vm.record.guest_pid
        log.warning("guest_lost", vm=vm.name, reason=reason, restart="running" if run else "paused")
        try:
            await vm.restart_guest(self.host.guest_log(vm.name), self.host.cfg.migration.guest_ack_timeout_s, run)
        except (VmError, GuestError, SegmentError, OSError) as exc:
            n = self._failures[vm.name] = self._failures.get(vm.name, 0) + 1
            delay = min(RESTART_BACKOFF_MAX_S, SUPERVISE_PERIOD_S * 2 ** n)
            self._next_try[vm.name] = time.monotonic() + delay
            log.error("guest_restart_failed", vm=vm.name, error=str(exc), attempt=n, retry_in_s=delay)
            return
        finally:
            vm.restarting = False
        self._failures.pop(vm.name, None)
        self._next_try.pop(vm.name, None)
        vm.record.guest_restarts += 1
        if self.host.registry.holds(vm):
            self.host.registry.save(vm)
        log.info("guest_restarted", vm=vm.name, old_pid=old_pid, pid=vm.record.guest_pid,
                 restarts=vm.record.guest_restarts, paused=not run)


class Agent:
    def __init__(self, cfg: AgentConfig, metrics_listen: str | None = None) -> None:
        self.cfg = cfg
        a = cfg.agent
        os.makedirs(a.data_dir, mode=0o700, exist_ok=True)
        self.lock = InstanceLock(cfg).acquire()      # before anything touches the data dir or /dev/shm
        try:
            registry = VmRegistry(a.data_dir, a.shm_prefix, a.name)
            self.host = Host(cfg=cfg, registry=registry, auth_key=cfg.auth_key())
        except BaseException:
            self.lock.release()
            raise
        self.tasks = TaskSet("agent")                # heat, supervisor, recovery, watchdog, restarts
        self.jobs = TaskSet("outbound")              # outbound migrations
        self.endpoint = MigrationEndpoint(self.host)
        self.supervisor = GuestSupervisor(self.host, self.tasks)
        self.stop_event = asyncio.Event()
        self.shutting_down = False
        self.started_at = time.time()
        self.metrics = AgentMetrics(gauges=lambda: host_gauges(self.host))
        self.host.jobs.observers.append(_JobMetrics(self.metrics))
        self.host.jobs.observers.append(JobHistory(a.data_dir))    # history.jsonl: jobs, vm show
        metrics_listen = metrics_listen or cfg.metrics.listen      # --metrics wins over [metrics] listen
        self.metrics_server = MetricsServer(self.metrics, *parse_hostport(metrics_listen)) if metrics_listen else None
        self.metrics_addr: str | None = None
        handlers: dict = {}
        for ops in (StatusOps(self), VmOps(self), MigrateOps(self), JobOps(self)):
            handlers.update(ops.handlers())
        # storage.move, and cancel for storage jobs (other jobs go on to JobOps' cancel)
        handlers.update(StorageOps(self, other_cancel=handlers["cancel"]).handlers())
        self.control = ControlServer(a.control, a.control_mode, handlers, group=cfg.control.group)

    # ---- lifecycle -------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        log.info("config_loaded", **self.cfg.as_dict())
        addr = await self.endpoint.bind()
        self.host.listen_addr = f"{addr[0]}:{addr[1]}"
        await self.control.bind()
        reg = self.host.registry
        log.info("vms_adopted", **reg.adopt())
        log.info("segments_swept", **reg.sweep_orphans())
        log.info("storage_moves_recovered", **await asyncio.to_thread(recover_moves, self.host))
        log.info("incoming_storage_recovered", **await asyncio.to_thread(recover_incoming, self.host))
        await self.endpoint.serve()
        await self.control.serve()
        if self.metrics_server is not None:
            maddr = await self.metrics_server.start()
            self.metrics_addr = f"{maddr[0]}:{maddr[1]}"
            log.info("metrics_listening", address=self.metrics_addr)
        self._start_background()
        log.info("listening", migration=self.host.listen_addr, control=self.cfg.agent.control, pid=os.getpid())
        sdnotify.ready()              # systemd (Type=notify): both endpoints accept connections
        sdnotify.status(f"{self.host.name}: migration {self.host.listen_addr}, control {self.cfg.agent.control}, "
                        f"{len(reg)} VMs")
        return addr

    def _start_background(self) -> None:
        self.tasks.spawn(self._track_heat(), "heat")
        self.tasks.spawn(self.supervisor.run(), "supervisor")
        interval = sdnotify.watchdog_interval_s()
        if interval:
            self.tasks.spawn(sdnotify.watchdog_loop(interval), "watchdog")
        for vm in self.host.registry:
            if not vm.broken and vm.record.state == "paused" and vm.record.outbound:
                self.start_resolver(vm)

    def start_resolver(self, vm: Vm) -> asyncio.Task | None:
        """Ask the destination how the outbound migration of a paused VM ended."""
        from agent.migration.recovery import resolve_outbound

        if vm.resolver is not None and not vm.resolver.done():
            return vm.resolver
        vm.resolver = self.tasks.spawn(resolve_outbound(self.host, vm), f"resolve-outbound:{vm.name}")
        return vm.resolver

    async def serve(self) -> None:
        await self.stop_event.wait()

    async def _track_heat(self) -> None:
        """Sample each idle VM's dirty map once per period (see heat.py)."""
        while True:
            await asyncio.sleep(HEAT_PERIOD_S)
            for vm in self.host.registry:
                # A migration owns the dirty map from the moment it is queued.
                if vm.migrating is None and vm.record.state == "running" and not vm.broken and not vm.ram.closed:
                    vm.heat.update(DirtyMap(vm.ram.dirty).collect())

    def request_stop(self) -> None:
        self.stop_event.set()

    async def shutdown(self, grace_s: float = 10.0) -> None:
        self.shutting_down = True                # migrate/drain refuse from now on
        sdnotify.stopping()
        running = len(self.jobs) + len(self.endpoint.tasks)
        sdnotify.status(f"{self.host.name}: stopping, {running} migrations get {grace_s:g} s")
        log.info("shutting_down", outbound=len(self.jobs), inbound=len(self.endpoint.tasks), grace_s=grace_s)
        self.endpoint.close()
        await asyncio.gather(self.jobs.shutdown(grace_s), self.endpoint.shutdown(grace_s))
        await self._close_own()
        log.info("stopped", vms_left_running=len(self.host.registry))

    async def abort_start(self) -> None:
        """After a failed start: close what this agent opened (nothing of anyone else's)."""
        self.endpoint.close()
        self.tasks.cancel_all()
        await self._close_own()

    async def _close_own(self) -> None:
        await self.tasks.shutdown(0)
        await self.control.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        self._close_segments()
        self.lock.release()

    def _close_segments(self) -> None:
        for vm in self.host.registry:
            try:
                if vm.ram is not None:
                    vm.ram.close()
            except SegmentError as exc:       # a view still held by a cancelled task: harmless at exit
                log.warning("segment_close_deferred", vm=vm.name, error=str(exc))


def _install_signals(agent: Agent) -> None:
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


async def run_agent(cfg: AgentConfig, grace_s: float = 10.0, metrics: str | None = None) -> int:
    # The data plane's helper threads (digests, pre-fault) take the GIL in short
    # bursts; with the default 5 ms switch interval the event loop, which moves
    # the pages, can wait that long for it each time.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        agent = Agent(cfg, metrics_listen=metrics)
    except (AgentError, OSError) as exc:
        log.error("start_refused", error=str(exc))
        return 1
    _install_signals(agent)
    try:
        await agent.start()
    except (AgentError, OSError) as exc:
        log.error("start_failed", error=str(exc))
        await agent.abort_start()
        return 1
    await agent.serve()
    await agent.shutdown(grace_s)
    return 0
