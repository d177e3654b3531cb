"""Outbound jobs: queue, pick a target, migrate, requeue when the target is busy.

``run_outbound`` owns one job from ``queued`` to its end:

    loop:
        target = choose_target()        # one target, or the best of a drain's targets (probe)
        wait for a pair slot to target  # min(local, remote limit) per pair
        wait for a host slot            # max_live_migrations, inbound + outbound
        SourceMigration.run()           # one attempt; True = the target said BUSY -> back to queue
        back off (with jitter) and loop

A cancel while queued ends the job ``cancelled`` without touching the VM.
"""
from __future__ import annotations

import asyncio
import random

from protocol import ProtocolError, Welcome

from agent.daemon.config import parse_hostport
from agent.errors import AgentError, MigrationAborted
from agent.daemon.host import Host
from agent.migration.catalog import SECTIONS
from agent.migration.jobs import Job
from agent.observe.logs import get_logger
from agent.net.peer import open_session
from agent.migration.phases import MigrationPhase as P
from agent.migration.source import SourceMigration
from agent.daemon.vm import Vm

log = get_logger("livemig.outbound")

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 1.0
MAX_NO_ROOM_ATTEMPTS = 40          # a drain whose targets all lack memory gives up after ~30 s


async def probe(host: Host, target: str, timeout_s: float = 5.0) -> Welcome | None:
    """Hello/Welcome and close: the target's limit, free slots, memory and status."""
    h, p = parse_hostport(target)
    try:
        async with asyncio.timeout(timeout_s):
            conn, _, welcome = await open_session(host, h, p)
    except (AgentError, ProtocolError, OSError, TimeoutError) as exc:
        log.info("probe_failed", target=target, error=str(exc))
        return None
    conn.close()
    host.pairs.learn(target, welcome.max_live_migrations)
    return welcome


async def choose_target(host: Host, vm: Vm, job: Job) -> str | None:
    """The drain target with the most free slots that has room for the VM, or None."""
    if len(job.targets) == 1:
        return job.targets[0]
    welcomes = await asyncio.gather(*(probe(host, t, host.cfg.migration.handshake_timeout_s) for t in job.targets))
    best, best_key = None, None
    for target, w in zip(job.targets, welcomes):
        if w is None or w.status != "accepting" or w.memory_free_bytes < vm.record.memory_bytes:
            continue
        ours = host.pairs.in_flight.get(target, 0)
        pair_room = host.pairs.limit(target) - ours
        key = (w.slots_free > 0 and pair_room > 0, w.slots_free, pair_room, w.memory_free_bytes)
        if best_key is None or key > best_key:
            best, best_key = target, key
    return best


async def run_outbound(host: Host, job: Job, vm: Vm, *, downtime_ms=None, max_bandwidth_mibps=None,
                       verify: str | None = None, options: dict | None = None) -> None:
    attempt = 0
    no_room = 0
    try:
        while True:
            target = await choose_target(host, vm, job)
            if target is None:
                no_room += 1
                job.last_refusal = "no target has room for the VM now"
                if no_room >= MAX_NO_ROOM_ATTEMPTS:
                    raise MigrationAborted("queued", f"no target among {', '.join(job.targets)} "
                                                     f"can take {vm.record.memory_bytes / 2**20:.0f} MiB")
                await _backoff(no_room)
                continue
            job.destination = target
            peer_host, peer_port = parse_hostport(target)
            await host.pairs.acquire(target, job.priority)
            try:
                await host.slots.acquire(job.priority)
                try:
                    attempt_options = await SECTIONS.plan(host, vm, target, dict(options or {}))
                    driver = SourceMigration(host, job, vm, peer_host, peer_port, downtime_target_ms=downtime_ms,
                                             max_bandwidth_mibps=max_bandwidth_mibps,
                                             requeue_on_full=len(job.targets) > 1, verify=verify,
                                             options=attempt_options)
                    requeued = await driver.run()
                finally:
                    host.slots.release()
            finally:
                host.pairs.release(target)
            if not requeued:
                return
            attempt += 1
            await _backoff(attempt)
    except asyncio.CancelledError:
        _end_queued(job, vm, P.CANCELLING, P.CANCELLED, "cancelled while queued")
        raise
    except AgentError as exc:
        _end_queued(job, vm, P.ROLLING_BACK, P.FAILED, str(exc))
    except Exception as exc:          # e.g. a section's plan hook: the job must still end
        log.exception("outbound_internal_error", job=job.id)
        _end_queued(job, vm, P.ROLLING_BACK, P.FAILED, f"internal error: {exc!r}")


def _end_queued(job: Job, vm: Vm, via: P, final: P, reason: str) -> None:
    if job.phase is P.QUEUED:         # a running attempt ends the job itself
        job.tracker.set_phase(expected=P.QUEUED, new=via)
        job.tracker.set_phase(expected=via, new=final)
        job.error = reason
        vm.migrating = None
        job.finish()
        log.info("job_ended_in_queue", job=job.id, vm=job.vm, state=final.value, reason=reason)


async def _backoff(attempt: int) -> None:
    delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(attempt, 10))
    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
