"""Resolving a switchover whose outcome this host does not know.

The source owns the VM until it sends Resume. After that, and until it
hears Resumed, only the destination knows whether its guest started. So a
source that lost the answer (connection dropped, agent restarted) asks the
destination, on a new connection and by migration id, until it answers:

    running      the destination runs the VM (always a copy verified before
                 it resumed): release the local copy
    discarded    it had the migration and dropped it: resume here
    unknown      it never took the VM (its "taken" record is written before
                 its guest resumes, so unknown means not running): resume here
    in-progress  it is still deciding: ask again
    unreachable  ask again, with backoff; the VM stays paused, and says why

It never resumes here while the destination may run the VM, so there is at
most one running copy; and it never gives up, so a paused VM always has a
way back (``vm resume --force`` is the operator's override).
"""
from __future__ import annotations

import asyncio
import enum
import os
import time

from memstore import Cmd
from protocol import ProtocolError, Query, QueryResult

from agent.errors import AgentError, VmError
from agent.observe.logs import get_logger

log = get_logger("livemig.recovery")

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0


class Outcome(enum.Enum):
    RUNNING = "running"          # the destination runs the VM
    DISCARDED = "discarded"      # it does not, and never will
    UNANSWERED = "unanswered"    # no answer yet


_ANSWERS = {"running": Outcome.RUNNING, "discarded": Outcome.DISCARDED, "unknown": Outcome.DISCARDED}


async def ask_once(host, migration_id: str, peer: str) -> Outcome:
    from agent.daemon.config import parse_hostport
    from agent.net.peer import open_session

    h, p = parse_hostport(peer)
    conn, _, _ = await open_session(host, h, p)
    try:
        await conn.send(Query(migration_id=migration_id))
        res = await conn.expect(QueryResult, host.cfg.migration.handshake_timeout_s)
    finally:
        conn.close()
    log.info("in_doubt_query", migration_id=migration_id, peer=peer, state=res.state)
    return _ANSWERS.get(res.state, Outcome.UNANSWERED)


async def ask_until_answered(host, vm, migration_id: str, peer: str, timeout_s: float | None) -> Outcome:
    """Ask until the destination answers running/discarded, or ``timeout_s``
    passes (None: forever). The VM's ``hold_reason`` says what it waits for."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    delay = BACKOFF_MIN_S
    vm.hold_reason = f"waiting for {peer} to say whether it runs {vm.name} (migration {migration_id})"
    while True:
        try:
            outcome = await ask_once(host, migration_id, peer)
            if outcome is not Outcome.UNANSWERED:
                return outcome
        except (AgentError, ProtocolError, OSError, TimeoutError) as exc:
            log.warning("in_doubt_query_failed", migration_id=migration_id, peer=peer, error=str(exc))
        if deadline is not None and time.monotonic() + delay > deadline:
            return Outcome.UNANSWERED
        await asyncio.sleep(delay)
        delay = min(delay * 2, BACKOFF_MAX_S)


async def resume_here(host, vm) -> None:
    """The VM goes on on this host: guest running (restarted from its memory
    and vCPU state if it died), throttle 0, record running, no migration."""
    mcfg = host.cfg.migration
    vm.ctl.throttle_pct = 0
    try:
        await vm.resume(mcfg.guest_ack_timeout_s)
    except VmError as exc:                   # died (or hung): a new guest from its memory and vCPU state
        log.warning("guest_restarted_to_resume", vm=vm.name, error=str(exc))
        await vm.restart_guest(host.guest_log(vm.name), mcfg.guest_ack_timeout_s, run=True)
        vm.record.guest_restarts += 1
    vm.record.state = "running"
    vm.record.outbound = None
    vm.hold_reason = ""
    host.registry.save(vm)


def keep_running_here(host, vm) -> None:
    """Last resort when resuming here failed: the VM is this host's, so no
    migration holds it any more, the record says so (best effort), and the
    supervisor (re)starts its guest from its memory with RUN."""
    vm.record.state, vm.record.outbound, vm.hold_reason = "running", None, ""
    try:
        host.registry.save(vm)
    except OSError as exc:
        log.error("record_not_saved", vm=vm.name, error=str(exc))
    if not vm.broken:
        vm.ctl.command(Cmd.RUN)
        vm.guest_wanted = True


async def release_source(host, vm) -> None:
    """The destination runs the VM: drop the copy here (guest, segment,
    record, and the files the sections listed in the outbound record, e.g.
    disk images now copied to the destination; shared files are not listed)."""
    delete = list((vm.record.outbound or {}).get("delete_files", []))
    await vm.stop_guest(host.cfg.migration.guest_ack_timeout_s)
    vm.release()
    host.registry.remove(vm)
    for path in delete:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:         # the VM runs elsewhere; a leftover file is reported, not fatal
            log.error("source_file_not_deleted", vm=vm.name, path=path, error=str(exc))
    if delete:                         # the VM's own default disk folder, if the move emptied it
        try:
            os.rmdir(os.path.join(host.cfg.agent.data_dir, "disks", vm.name))
        except OSError:
            pass
    vm.hold_reason = ""
    vm.migrating = None


async def resolve_outbound(host, vm) -> None:
    """A VM left paused by an outbound switchover (``record.outbound``): ask
    its destination until it answers, then release or resume it here."""
    out = vm.record.outbound or {}
    mid, peer = out.get("id", ""), out.get("peer", "")
    if not mid or not peer:
        log.error("outbound_record_incomplete", vm=vm.name, outbound=out)
        vm.hold_reason = "paused by a migration whose record names no destination: resume it with --force"
        return
    outcome = await ask_until_answered(host, vm, mid, peer, None)
    if vm.record.outbound is None or vm.record.outbound.get("id") != mid:
        return                                  # the operator resolved it meanwhile (vm resume --force)
    if outcome is Outcome.RUNNING:
        log.info("in_doubt_resolved", vm=vm.name, outcome="released", peer=peer)
        await release_source(host, vm)
        return
    log.info("in_doubt_resolved", vm=vm.name, outcome="resumed here", peer=peer)
    try:
        await resume_here(host, vm)
    except Exception as exc:          # the destination does not run it: never leave it paused or dead
        log.error("resume_after_resolution_failed", vm=vm.name, error=repr(exc))
        keep_running_here(host, vm)


def spawn_resolver(host, vm) -> asyncio.Task:
    """Keep resolving ``vm`` in the background (one task per VM, kept as
    ``vm.resolver`` so that ``vm resume --force`` can stop it; an agent that
    stops meanwhile resumes the work at its next start from ``record.outbound``)."""
    task = getattr(vm, "resolver", None)
    if task is not None and not task.done():
        return task
    vm.resolver = asyncio.get_running_loop().create_task(resolve_outbound(host, vm), name=f"resolve-outbound:{vm.name}")
    return vm.resolver
