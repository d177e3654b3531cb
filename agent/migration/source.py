"""SourceMigration: walks one outbound migration through its phases, over
the VM's sections (section.py), knowing nothing of pages or blocks.

    negotiate      connect, Hello/Welcome(/Auth), Prepare(sections) -> Ready
    setup          (the destination builds and pre-faults the shell)
    precopy        rounds over the stream sections until the sum of their
                   pending bytes fits the downtime target (convergence.py);
                   auto-converge throttles a guest that dirties faster than
                   the link carries
    stop-and-copy  record the migration durably, pause the guest, every
                   section sends what is left, then the vCPU state
    verify         the destination sends each section's digests of what it
                   holds (its guest still paused); we compare them with our
                   frozen copy's
    resume         Resume (only after every section matched) -> Resumed
    commit         release the source copy (guest, segment, record)

Who owns the VM: this host until Resume is sent. From the pause to Resume
the switchover has a deadline (``migration.switchover_timeout_ms``): past it
the guest resumes here. Once Resume is sent the outcome is in doubt until
Resumed: it is resolved by asking the destination (recovery.py), never by
assuming, and the frozen copy stays paused until the answer comes.
"""
from __future__ import annotations

import asyncio
import time

import structlog

from protocol import (
    Commit,
    Committed,
    Digests,
    ErrorCode,
    ProtocolError,
    Ready,
    Resume,
    Resumed,
    RoundAck,
    RoundEnd,
    StateTransfer,
)

from agent.daemon.host import Host
from agent.daemon.vm import Vm
from agent.errors import AgentError, MigrationAborted, PeerError, VmError
from agent.migration import convergence, testhooks
from agent.migration.jobs import Job
from agent.migration.catalog import SECTIONS
from agent.migration.phases import MigrationPhase as P, gc_paused, log_phase_change
from agent.migration.recovery import (Outcome, ask_until_answered, keep_running_here, release_source,
                                      resume_here, spawn_resolver)
from agent.migration.section import OutgoingSection
from agent.migration.stream import SourceStream, prepare_message
from agent.net import tls
from agent.net.datastream import OutboundStreams
from agent.net.peer import open_session
from agent.observe.logs import get_logger

log = get_logger("livemig.source")

ITERATE_BUDGET_BYTES = 16 * 2**20   # one section's turn in a round; the loop serves requests in between


class Requeue(Exception):
    """The destination cannot take the VM now; the job goes back to the queue."""


class SourceMigration:
    def __init__(self, host: Host, job: Job, vm: Vm, peer_host: str, peer_port: int, *,
                 downtime_target_ms: int | None = None, max_bandwidth_mibps: int | None = None,
                 requeue_on_full: bool = False, verify: str | None = None, options: dict | None = None) -> None:
        self.host, self.job, self.vm = host, job, vm
        self.peer_host, self.peer_port = peer_host, peer_port
        mcfg = host.cfg.migration
        tuned = getattr(job, "tuned", {})          # job set survives a requeue (a new attempt, a new driver)
        self.downtime_target_ms = tuned.get("downtime_ms") or downtime_target_ms or mcfg.downtime_target_ms
        bw = mcfg.max_bandwidth_mibps if max_bandwidth_mibps is None else max_bandwidth_mibps
        bw = tuned.get("max_bandwidth_mibps", bw)
        self.max_bandwidth_bps = bw * 2**20
        self.verify_mode = verify or mcfg.verify
        self.streams = getattr(job, "streams", None) or mcfg.data_streams()     # offered in Prepare
        self.options = dict(options or {})          # per-migration section options (e.g. storage mode)
        self.conn = None
        self.stream: SourceStream | None = None
        self.sections: list[OutgoingSection] = []
        self.paused = False
        self.resume_sent = False
        self.acked_round = 0                 # the last round the destination said is in its memory
        self.t_pause = 0.0
        # BUSY always waits for a slot; in a drain over several targets a full
        # or maintenance target is also a reason to try again (elsewhere).
        self.requeue_codes = {int(ErrorCode.BUSY)} | (
            {int(ErrorCode.NO_MEMORY), int(ErrorCode.MAINTENANCE)} if requeue_on_full else set())

    @property
    def peer(self) -> str:
        return f"{self.peer_host}:{self.peer_port}"

    def tune(self, *, max_bandwidth_mibps: int | None = None, downtime_ms: int | None = None) -> dict:
        """Change the bandwidth cap and the downtime target of the running
        migration (virsh migrate-setspeed / migrate-setmaxdowntime); they take
        effect at the next batch and the next convergence decision."""
        tuned = self.job.__dict__.setdefault("tuned", {})
        if max_bandwidth_mibps is not None:
            tuned["max_bandwidth_mibps"] = max_bandwidth_mibps
            self.max_bandwidth_bps = max_bandwidth_mibps * 2**20
            if self.stream is not None:
                self.stream.set_max_bandwidth(self.max_bandwidth_bps)
        if downtime_ms is not None:
            tuned["downtime_ms"] = downtime_ms
            self.downtime_target_ms = downtime_ms
        self.job.stats.downtime_target_ms = self.downtime_target_ms
        self.job.stats.max_bandwidth_mibps = self.max_bandwidth_bps // 2**20
        log.info("migration_tuned", max_bandwidth_mibps=self.max_bandwidth_bps // 2**20,
                 downtime_ms=self.downtime_target_ms)
        return {"max_bandwidth_mibps": self.max_bandwidth_bps // 2**20, "downtime_ms": self.downtime_target_ms}

    # ---- entry -------------------------------------------------------------
    async def run(self) -> bool:
        """One attempt. Returns True when the job went back to the queue
        (destination busy before anything was transferred)."""
        job = self.job
        job.driver = self                    # job set: tune() while it runs
        with structlog.contextvars.bound_contextvars(migration_id=job.id, vm=job.vm, role="source", peer=job.destination):
            self.vm.on_guest_lost.append(self._guest_lost)
            requeued = False
            try:
                await self._migrate()
            except Requeue as exc:
                requeued = True
                await self._requeued(exc)
            except asyncio.CancelledError:
                await asyncio.shield(self._fail("cancelled", cancelled=True))
                raise
            except (AgentError, ProtocolError, OSError, TimeoutError) as exc:
                # Shielded: an agent shutdown must not stop a rollback halfway.
                await asyncio.shield(self._fail(str(exc) or type(exc).__name__))
            except Exception as exc:  # a bug must still roll back, never strand the guest
                log.exception("migration_internal_error")
                await asyncio.shield(self._fail(f"internal error: {exc!r}"))
            finally:
                self._detach()
                if not requeued:
                    job.finish()
            return requeued

    async def _requeued(self, exc: Requeue) -> None:
        job = self.job
        job.requeues += 1
        job.last_refusal = str(exc)
        # Back in the queue before anything awaits: a cancel from here on is
        # the queue's (outbound.py), which ends the job.
        job.tracker.set_phase(expected=(P.NEGOTIATE, P.SETUP), new=P.QUEUED)
        log.info("requeued", reason=str(exc))
        await asyncio.shield(self._cleanup_sections(committed=False))

    def _detach(self) -> None:
        if self._guest_lost in self.vm.on_guest_lost:
            self.vm.on_guest_lost.remove(self._guest_lost)
        if self.conn is not None:
            self.conn.close()

    def _guest_lost(self, vm: Vm, reason: str) -> None:
        """The supervisor found our guest dead. Before Resume the migration
        fails (rollback restarts the guest here); after it the destination
        runs the VM and the source copy is being released anyway."""
        if not self.resume_sent and self.conn is not None:
            exc = VmError(f"guest of {vm.name} died during the migration: {reason}")
            self.conn.fail(exc)
            if self.stream is not None and self.stream.data is not None:
                self.stream.data.interrupt(exc)

    async def _enter(self, expected, new: P) -> None:
        self.job.tracker.set_phase(expected=expected, new=new)
        await testhooks.hold(self.host.cfg.agent.data_dir, "source", new.value, self.job.id)

    # ---- the phases, in order -------------------------------------------
    async def _migrate(self) -> None:
        await self._negotiate()
        await self._setup()
        await self._precopy()
        await self._enter(P.PRECOPY, P.STOP_AND_COPY)
        deadline = self.host.cfg.migration.switchover_deadline_s(self.downtime_target_ms)
        with gc_paused():                                    # the guest is paused from here to Resumed
            try:
                async with asyncio.timeout(deadline) as cm:  # from the pause until Resume is sent
                    await self._stop_and_copy()
                    await self._verify()
            except TimeoutError:
                if not cm.expired():
                    raise
                raise MigrationAborted(self.job.phase.value, f"switchover deadline of {deadline * 1000:.0f} ms "
                                                             f"passed before the destination was verified; resumed "
                                                             f"on the source") from None
            await self._resume()
        await self._commit()

    async def _negotiate(self) -> None:
        job, vm, host = self.job, self.vm, self.host
        job.stats.ram_bytes = vm.record.memory_bytes
        job.stats.pages_total = vm.ram.npages
        job.stats.verify_mode = self.verify_mode
        job.stats.downtime_target_ms = self.downtime_target_ms
        job.stats.max_bandwidth_mibps = self.max_bandwidth_bps // 2**20
        job.started_at = time.time()
        vm.migrating = job.id
        job.stats.round_log.clear()
        job.stats.guest_rate_before_pps = int(vm.ctl.rate_pps)
        job.tracker.on_change(log_phase_change)
        await self._enter(P.QUEUED, P.NEGOTIATE)
        self.conn, agreement, welcome = await open_session(host, self.peer_host, self.peer_port)
        host.pairs.learn(job.destination, welcome.max_live_migrations)
        job.slots = agreement.slots
        job.peer_agent = welcome.agent
        log.info("negotiated", version=agreement.version, slots=agreement.slots,
                 features=sorted(agreement.features), peer_agent=welcome.agent)
        self.stream = SourceStream(self.conn, job, host, self.max_bandwidth_bps, vm)
        self.sections = SECTIONS.build_outgoing(vm=vm, stream=self.stream, host=host, options=self.options)
        await self.conn.send(prepare_message(job, vm, host, self.sections, self.verify_mode, self.streams))

    async def _setup(self) -> None:
        await self._enter(P.NEGOTIATE, P.SETUP)
        mcfg = self.host.cfg.migration
        # The destination creates and pre-faults the shell; allow time for that.
        budget_s = mcfg.io_timeout_s + self.vm.record.memory_bytes / 2**30 * 5.0
        try:
            ready = await self._expect(Ready, budget_s)
        except PeerError as exc:
            if exc.code in self.requeue_codes:
                raise Requeue(str(exc)) from exc
            raise
        self.job.stats.prefault_ms = ready.prefault_ms
        await self._open_streams(ready)

    async def _open_streams(self, ready: Ready) -> None:
        """The data streams Ready granted, to the same endpoint (datastream.py)."""
        host, mcfg = self.host, self.host.cfg.migration
        asked = self.streams
        if not 1 <= ready.streams <= asked:
            raise PeerError(f"{self.peer} granted {ready.streams} data streams, {asked} were offered",
                            int(ErrorCode.MALFORMED))
        data = OutboundStreams(ready.streams, on_failure=self.conn.fail)
        self.stream.data = data
        ctx = tls.client_context(host.cfg.security) if host.cfg.security.tls else None
        await data.open(self.peer_host, self.peer_port, self.job.id, ready.token, ctx, self.conn.peer_name,
                        mcfg.handshake_timeout_s, mcfg.io_timeout_s)
        self.job.stats.streams = ready.streams
        log.info("data_streams_open", streams=ready.streams, tls=ctx is not None)

    async def _precopy(self) -> None:
        await self._enter(P.SETUP, P.PRECOPY)
        st, mcfg = self.job.stats, self.host.cfg.migration
        self.stream.start_clock()
        await self._round(1)
        history = [self.vm.record.memory_bytes, st.remaining_bytes]
        extra = 0
        while True:
            decision = convergence.should_complete(convergence.RoundFacts(
                round=st.rounds, remaining_bytes=st.remaining_bytes, bandwidth_bps=st.bandwidth_bps,
                downtime_target_ms=self.downtime_target_ms, max_rounds=mcfg.max_rounds,
                throttle_pct=st.throttle_pct, remaining_history=tuple(history[:-1])))
            if decision is not convergence.Decision.ITERATE:
                st.convergence = decision.value
                # Let both sides catch up before the pause: the destination's
                # backlog (buffers, its hashing: it acks a round once hashed)
                # and our own hashing would otherwise be downtime.
                await self._wait_round_ack(st.rounds)
                for s in self.sections:
                    await s.settle()
                # The guest wrote on while we waited (the destination's hashing
                # backlog of all earlier rounds can take tens of ms): when that
                # left more than the decision saw, one more (short) round, so
                # it is not sent inside the pause; bounded.
                rest = sum(s.pending_exact() for s in self.sections)
                if (extra < convergence.MAX_EXTRA_ROUNDS and st.rounds < mcfg.max_rounds + convergence.MAX_EXTRA_ROUNDS
                        and rest > max(convergence.SMALL_REMAINDER_BYTES, 2 * st.remaining_bytes)):
                    extra += 1
                    log.info("round_after_ack", rest_bytes=rest, decided_on_bytes=st.remaining_bytes)
                    await self._round(st.rounds + 1)
                    history.append(st.remaining_bytes)
                    continue
                return
            await self._round(st.rounds + 1)
            history.append(st.remaining_bytes)
            self.stream.throttle_check(force=True)

    async def _round(self, round_no: int) -> None:
        t0 = time.monotonic()
        sent0 = self.stream.pages_sent
        stream_sections = [s for s in self.sections if s.JOINS == "stream"]
        for s in stream_sections:
            s.begin_round(round_no)
        self.job.stats.remaining_bytes = sum(x.pending_estimate() for x in self.sections)
        pending = list(stream_sections)
        while pending:
            for s in list(pending):
                if await s.iterate(ITERATE_BUDGET_BYTES):
                    pending.remove(s)
                self.job.stats.remaining_bytes = sum(x.pending_estimate() for x in self.sections)
            await asyncio.sleep(0)
        await self._end_round(round_no, self.stream.pages_sent - sent0, t0)

    async def _stop_and_copy(self) -> None:
        job, vm, st = self.job, self.vm, self.job.stats
        st.guest_rate_during_pps = int(vm.ctl.rate_pps)
        # Durable before the pause (so not part of it): a restart must not
        # resume a VM that may run elsewhere, and must know whom to ask.
        self.paused = True
        vm.record.state = "paused"
        delete = [f for sec in self.sections for f in sec.release_info().get("delete_files", [])]
        vm.record.outbound = {"id": job.id, "peer": self.peer, "phase": P.STOP_AND_COPY.value, "delete_files": delete}
        self.host.registry.save(vm)
        self.t_pause = time.monotonic()
        await vm.pause(self.host.cfg.migration.guest_ack_timeout_s)
        st.writes_at_pause = int(vm.ctl.writes)
        t0, sent0 = time.monotonic(), self.stream.pages_sent
        for s in self.sections:
            await s.complete()
        st.stop_copy_pages = self.stream.pages_sent - sent0
        await self._end_round(st.rounds + 1, st.stop_copy_pages, t0)
        paused_ms = (time.monotonic() - self.t_pause) * 1000.0    # so the destination can tell its downtime
        await self.conn.send(StateTransfer(vcpu_state=vm.ctl.vcpu_state(), device_state=self.stream.device_state(paused_ms)))
        # The rest of the last round leaves meanwhile; the streams end (EOF), their threads are joined at the end.
        self.stream.data.finish()

    async def _verify(self) -> None:
        """Every section's digests of the frozen source against the
        destination's, its guest still paused. Resume only on a full match."""
        await self._enter(P.STOP_AND_COPY, P.VERIFY)
        t0 = time.monotonic()
        ours = [asyncio.create_task(s.digests(self.verify_mode)) for s in self.sections]
        try:
            theirs = {}
            for _ in self.sections:
                d = await self._expect(Digests)
                theirs[d.section] = d
            for s, task in zip(self.sections, ours):
                self._compare(s, await task, theirs.get(s.section_id))
        finally:
            for task in ours:
                task.cancel()
        self.job.stats.verify_ms = (time.monotonic() - t0) * 1000.0
        self.job.verified = True
        log.info("verified", mode=self.verify_mode, verify_ms=round(self.job.stats.verify_ms, 1))

    def _compare(self, section: OutgoingSection, ours: tuple[int, bytes], theirs: Digests | None) -> None:
        chunk_pages, digests = ours
        if theirs is None or theirs.chunk_pages != chunk_pages or len(theirs.digests) != len(digests):
            raise MigrationAborted("verify", f"{section.NAME}: the destination's digests do not cover the same data")
        if theirs.digests != digests:
            from agent.migration.verify import diff_chunks
            bad = diff_chunks(digests, theirs.digests)
            log.error("verify_failed", section=section.NAME, chunks=len(bad), first_chunk=bad[0])
            self.job.verify_failed = True
            raise MigrationAborted("verify", f"{section.NAME}: {len(bad)} chunk(s) differ on the destination "
                                             f"(first at page {bad[0] * chunk_pages}); resumed on the source")

    async def _resume(self) -> None:
        await self._enter(P.VERIFY, P.RESUME)
        deadline = self.host.cfg.migration.switchover_deadline_s(self.downtime_target_ms)
        if time.monotonic() - self.t_pause > deadline:
            raise MigrationAborted("resume", f"switchover deadline of {deadline * 1000:.0f} ms passed; "
                                             f"resumed on the source")
        self.conn.check()                    # a connection already lost: Resume never leaves, nothing is in doubt
        self.resume_sent = True              # from here the destination may run the VM
        await self.conn.send(Resume(migration_id=self.job.id))
        resumed = await self._expect(Resumed)
        st = self.job.stats
        st.downtime_ms = (time.monotonic() - self.t_pause) * 1000.0
        st.writes_after_resume = resumed.writes
        log.info("destination_resumed", downtime_ms=round(st.downtime_ms, 1), writes=resumed.writes)

    async def _commit(self) -> None:
        await self._enter(P.RESUME, P.COMMIT)
        try:
            await self.conn.send(Commit(migration_id=self.job.id))
            await self._expect(Committed)
        except (AgentError, ProtocolError) as exc:
            # The destination owns the VM from Resume on; a lost Committed changes nothing.
            log.warning("commit_ack_lost", error=str(exc))
        await self._finish_commit()

    async def _finish_commit(self) -> None:
        if self.conn is not None:
            await self.conn.wait_closed()      # the transport may still hold views of the segment
        await self._cleanup_sections(committed=True)
        await release_source(self.host, self.vm)
        self.job.tracker.set_phase(expected=P.COMMIT, new=P.COMPLETED)
        log.info("migration_completed", **{k: v for k, v in self.job.report().items()
                                           if k in ("total_ms", "downtime_ms", "iterations", "bytes_sent", "verified")})

    # ---- rounds --------------------------------------------------------------
    async def _expect(self, cls, timeout_s: float | None = None):
        """The next message of type ``cls``; RoundAcks that arrive first (the
        destination acks every round, we wait only for the last) are noted."""
        timeout_s = self.host.cfg.migration.io_timeout_s if timeout_s is None else timeout_s
        while True:
            msg = await self.conn.expect((cls, RoundAck), timeout_s)
            if not isinstance(msg, RoundAck) or cls is RoundAck:
                return msg
            self.acked_round = max(self.acked_round, msg.round)

    async def _wait_round_ack(self, round_no: int) -> None:
        t0 = time.monotonic()
        while self.acked_round < round_no:
            self.acked_round = max(self.acked_round, (await self._expect(RoundAck)).round)
        log.info("round_acked", round=round_no, wait_ms=round((time.monotonic() - t0) * 1000.0, 1))

    async def _end_round(self, round_no: int, sent_pages: int, t_start: float) -> None:
        st = self.job.stats
        elapsed = max(time.monotonic() - t_start, 1e-6)
        remaining = sum(s.pending_exact() for s in self.sections)
        dirty_pages = remaining // 4096
        # Each data stream's RoundEnd behind its pages of the round, then the control stream's.
        self.stream.data.end_round(round_no, sent_pages, dirty_pages)
        await self.conn.send(RoundEnd(round=round_no, pages_sent=sent_pages, dirty_pages=dirty_pages))
        st.rounds = round_no
        round_bps = sent_pages * 4096 / elapsed
        # Bandwidth: this round's rate when it moved enough bytes to be meaningful, else the meter.
        if sent_pages * 4096 >= 4 * 2**20 or st.bandwidth_bps == 0:
            st.bandwidth_bps = round_bps if sent_pages else self.stream.meter.rate()
        st.remaining_bytes = remaining
        st.expected_downtime_ms = convergence.expected_downtime_ms(remaining, st.bandwidth_bps)
        st.round_log.append({"round": round_no, "pages_sent": sent_pages, "dirty_pages": dirty_pages,
                             "ms": round(elapsed * 1000.0, 1), "bandwidth_bps": round(round_bps),
                             "throttle_pct": st.throttle_pct, "downtime_target_ms": self.downtime_target_ms,
                             "max_bandwidth_mibps": self.max_bandwidth_bps // 2**20})
        log.info("round_finished", round=round_no, pages_sent=sent_pages, dirty_pages=dirty_pages,
                 elapsed_ms=round(elapsed * 1000.0, 1), mbps=round(round_bps * 8 / 1e6, 1),
                 expected_downtime_ms=round(st.expected_downtime_ms, 1))

    # ---- failure, by situation ---------------------------------------------
    async def _fail(self, reason: str, cancelled: bool = False) -> None:
        phase = self.job.phase
        if phase in (P.COMPLETED, P.FAILED, P.CANCELLED):
            return
        if phase is P.COMMIT:
            await self._fail_in_commit(reason)
        elif self.resume_sent:
            await self._fail_in_doubt(reason)
        else:
            await self._abandon(reason, cancelled)

    async def _fail_in_commit(self, reason: str) -> None:
        """Past the point of no return: the destination runs the VM. Finish the release."""
        log.error("commit_cleanup_failed", error=reason)
        self.job.error = f"commit cleanup: {reason}"
        await self._finish_commit()

    async def _abandon(self, reason: str, cancelled: bool) -> None:
        """Resume was never sent: the destination cannot run the VM (it starts
        its guest only on Resume), so the VM simply goes on here."""
        job, vm = self.job, self.vm
        job.error = reason
        log.warning("migration_rolling_back", phase=job.phase.value, error=reason)
        try:
            job.tracker.set_phase(expected=job.phase, new=P.CANCELLING if cancelled else P.ROLLING_BACK)
            if self.paused or not vm.guest_alive():
                await resume_here(self.host, vm)     # first: the pause must not wait for the peer
            vm.ctl.throttle_pct = 0
            await self._tell_peer(ErrorCode.CANCELLED if cancelled else
                                  ErrorCode.VERIFY_FAILED if job.verify_failed else ErrorCode.INTERNAL, reason)
        except Exception as exc:          # the VM is ours: never leave it paused or dead
            log.error("rollback_resume_failed", error=repr(exc))
            job.error = f"{reason}; rollback: {exc}"
            keep_running_here(self.host, vm)
        finally:
            await self._cleanup_sections(committed=False)
            vm.migrating = None
            if job.phase in (P.CANCELLING, P.ROLLING_BACK):
                job.tracker.set_phase(expected=job.phase, new=P.CANCELLED if cancelled else P.FAILED)
        log.info("rolled_back", vm_state=vm.state())

    async def _tell_peer(self, code: ErrorCode, reason: str) -> None:
        if self.conn is not None:
            await self.conn.abort(code, reason)
            # Drops the transport's views of the segment; the guest already runs
            # again, and a frozen peer must not hold the job's end for long.
            await self.conn.wait_closed(1.0)

    async def _fail_in_doubt(self, reason: str) -> None:
        """Resume was sent and Resumed did not come: ask the destination."""
        job = self.job
        log.warning("switchover_in_doubt", error=reason)
        if self.conn is not None:
            self.conn.close()                  # the destination answers "in-progress" while it waits on it
            await self.conn.wait_closed()
        outcome = await ask_until_answered(self.host, self.vm, job.id, self.peer,
                                           self.host.cfg.migration.resolve_timeout_s)
        if outcome is Outcome.RUNNING:
            if not job.stats.downtime_ms:
                job.stats.downtime_ms = (time.monotonic() - self.t_pause) * 1000.0
            job.tracker.set_phase(expected=P.RESUME, new=P.COMMIT)
            self.conn = None
            await self._finish_commit()
            return
        job.tracker.set_phase(expected=job.phase, new=P.ROLLING_BACK)
        try:
            if outcome is Outcome.DISCARDED:
                job.error = f"{reason}; the destination discarded its copy, resumed on the source"
                await resume_here(self.host, self.vm)
            else:
                job.error = (f"{reason}; {self.peer} has not said whether it runs {self.vm.name}: the VM stays "
                             f"paused here and this agent keeps asking")
                spawn_resolver(self.host, self.vm)
        except Exception as exc:          # the destination does not run it: never leave it paused or dead
            log.error("rollback_resume_failed", error=repr(exc))
            job.error = f"{job.error}; rollback: {exc}"
            keep_running_here(self.host, self.vm)
        finally:
            await self._cleanup_sections(committed=False)
            self.vm.migrating = None
            job.tracker.set_phase(expected=P.ROLLING_BACK, new=P.FAILED)

    async def _close_streams(self) -> None:
        """Stop and join the data streams' threads: they hold views of the
        segment, which must not outlive them (commit releases it)."""
        data = self.stream.data if self.stream is not None else None
        if data is not None:
            await data.close()
            self.stream.data = None           # only now: a cleanup cut short closes (again) next time

    async def _cleanup_sections(self, committed: bool) -> None:
        await self._close_streams()
        for s in self.sections:
            try:
                await s.cleanup(committed)
            except Exception:  # cleanup of one section must not stop the others
                log.exception("section_cleanup_failed", section=s.NAME)
        self.sections = []
