"""SourceMigration: walks one outbound migration through its phases.

    negotiate  connect, Hello/Welcome(/Auth), Prepare -> Ready
    setup      (destination builds and pre-faults the shell)
    precopy    round 1: every page (zero pages announced); rounds 2..n: the
               pages dirtied since the previous collect, until the rest fits
               the downtime target, max rounds, or a stall (convergence.py);
               auto-converge throttles the guest that dirties faster than
               the link carries
    stop-and-copy  pause the guest, send the last dirty pages + vCPU/device state
    verify     destination sends chunk digests of what it holds; we hash the
               frozen source and compare
    resume     Resume -> destination starts the guest -> Resumed
    commit     release the source copy (guest process, segment, record)

Any failure before Resume was sent rolls back: Abort to the peer, resume
the guest here. After Resume was sent and before Resumed arrived the
outcome is in doubt; ``_resolve_in_doubt`` asks the destination on a new
connection which way it went, and never resumes here while the
destination may be running the VM.
"""
from __future__ import annotations

import asyncio
import time

import msgpack
import structlog

from memstore import PAGE_SIZE, DirtyMap, PageRun, chunk_digests, diff_chunks, split_zero
from protocol import (
    MAX_BATCH_RUNS,
    BatchFlags,
    Commit,
    Committed,
    Digests,
    ErrorCode,
    PageBatch,
    Prepare,
    ProtocolError,
    Query,
    QueryResult,
    Ready,
    Resume,
    Resumed,
    RoundAck,
    RoundEnd,
    StateTransfer,
)

from agent.migration import convergence
from agent.errors import AgentError, MigrationAborted, PeerError, PeerLost, VmError
from agent.daemon.host import Host
from agent.migration.jobs import Job
from agent.observe.logs import get_logger
from agent.net.peer import open_session
from agent.migration.phases import MigrationPhase as P
from agent.migration.stats import BandwidthMeter
from agent.migration.verify import digest_chunk_pages
from agent.daemon.vm import Vm

log = get_logger("livemig.source")

BATCH_PAGES = 256               # 1 MiB of payload per batch of dirty pages
FULL_PASS_PAGES = 1024          # 4 MiB per batch in round 1 (contiguous: fewer headers and syscalls)
BATCH_RUNS = 1024
ZERO_BATCH_PAGES = 16384
YIELD_EVERY_BATCHES = 32        # let the loop serve control requests during a long pass


def batches(runs, max_pages: int = BATCH_PAGES, max_runs: int = BATCH_RUNS):
    """Group page runs into batches of at most max_pages pages and max_runs runs."""
    cur: list[tuple[int, int]] = []
    n = 0
    for first, count in runs:
        while count:
            take = min(count, max_pages - n)
            cur.append((first, take))
            n += take
            first += take
            count -= take
            if n == max_pages or len(cur) == max_runs:
                yield cur
                cur, n = [], 0
    if cur:
        yield cur


def populated_runs(ram, chunk_pages: int) -> tuple[tuple[int, int], ...]:
    """Chunks of the segment that hold data (SEEK_DATA), merged into runs, so
    the destination pre-faults only memory that will receive pages; a VM that
    never wrote most of its RAM costs the destination no memory for it. Falls
    back to everything when the runs would not fit one Prepare."""
    npages = ram.npages
    runs: list[tuple[int, int]] = []
    page = 0
    while page < npages:
        data = ram.next_data_page(page)
        if data >= npages:
            break
        start = data - data % chunk_pages
        end = min(npages, start + chunk_pages)
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end - runs[-1][0])
        else:
            runs.append((start, end - start))
        page = end
    if len(runs) > MAX_BATCH_RUNS:
        return ((0, npages),)
    return tuple(runs)


class Requeue(Exception):
    """The destination cannot take the VM now; the job goes back to the queue."""


class SourceMigration:
    def __init__(self, host: Host, job: Job, vm: Vm, peer_host: str, peer_port: int, *,
                 downtime_target_ms: int | None = None, max_bandwidth_mibps: int | None = None,
                 requeue_on_full: bool = False) -> None:
        self.host = host
        self.job = job
        self.vm = vm
        self.peer_host, self.peer_port = peer_host, peer_port
        mcfg = host.cfg.migration
        self.downtime_target_ms = downtime_target_ms or mcfg.downtime_target_ms
        bw = mcfg.max_bandwidth_mibps if max_bandwidth_mibps is None else max_bandwidth_mibps
        self.max_bandwidth_bps = bw * 2**20
        self.conn = None
        self.resume_sent = False
        self.verify_failed = False
        # BUSY always waits for a slot; in a drain over several targets a full
        # or maintenance target is also a reason to try again (elsewhere).
        self.requeue_codes = {int(ErrorCode.BUSY)} | (
            {int(ErrorCode.NO_MEMORY), int(ErrorCode.MAINTENANCE)} if requeue_on_full else set())
        self.t_pause = 0.0
        self.meter = BandwidthMeter()
        self._bw_t0 = 0.0
        self._bw_bytes = 0
        job.tracker._on_change = self._phase_changed

    def _phase_changed(self, old, new, elapsed_ms) -> None:
        log.info("phase_changed", old=old.value, new=new.value, elapsed_ms=round(elapsed_ms, 1))

    # ---- entry -------------------------------------------------------------
    async def run(self) -> bool:
        """One attempt. Returns True when the job went back to the queue
        (destination busy before anything was transferred)."""
        job = self.job
        requeued = False
        with structlog.contextvars.bound_contextvars(
            migration_id=job.id, vm=job.vm, role="source", peer=job.destination
        ):
            try:
                await self._migrate()
            except Requeue as exc:
                requeued = True
                job.requeues += 1
                job.last_refusal = str(exc)
                job.tracker.set_phase(expected=(P.NEGOTIATE, P.SETUP), new=P.QUEUED)
                log.info("requeued", reason=str(exc))
            except asyncio.CancelledError:
                await asyncio.shield(self._rollback("cancelled", cancelled=True))
                raise
            except (AgentError, ProtocolError, OSError) as exc:
                # Shielded: an agent shutdown must not stop a rollback halfway
                # (the guest would stay paused with nobody running the VM).
                await asyncio.shield(self._rollback(str(exc)))
            except Exception as exc:  # a bug must still roll back, never strand the guest
                log.exception("migration_internal_error")
                await asyncio.shield(self._rollback(f"internal error: {exc!r}"))
            finally:
                if self.conn is not None:
                    self.conn.close()
                if not requeued:
                    job.finish()
        return requeued

    # ---- the phases ------------------------------------------------------
    async def _migrate(self) -> None:
        job, vm, host = self.job, self.vm, self.host
        mcfg = host.cfg.migration
        ram = vm.ram
        st = job.stats
        st.ram_bytes = vm.record.memory_bytes
        st.pages_total = ram.npages
        job.started_at = time.time()
        job.tracker.set_phase(expected=P.QUEUED, new=P.NEGOTIATE)
        vm.migrating = job.id
        st.round_log.clear()
        st.guest_rate_before_pps = int(vm.ctl.rate_pps)

        self.conn, agreement, welcome = await open_session(host, self.peer_host, self.peer_port)
        host.pairs.learn(job.destination, welcome.max_live_migrations)
        job.slots = agreement.slots
        log.info("negotiated", version=agreement.version, slots=agreement.slots,
                 features=sorted(agreement.features), peer_agent=welcome.agent)
        conn = self.conn
        await conn.send(Prepare(
            migration_id=job.id, vm=vm.name, memory_bytes=vm.record.memory_bytes,
            workload=vm.record.workload, features=(), source=host.name,
            populated=populated_runs(ram, vm.heat.chunk_pages),
        ))
        job.tracker.set_phase(expected=P.NEGOTIATE, new=P.SETUP)
        # The destination creates and pre-faults the shell; allow time for that.
        prefault_budget_s = mcfg.io_timeout_s + vm.record.memory_bytes / 2**30 * 5.0
        try:
            ready = await conn.expect(Ready, prefault_budget_s)
        except PeerError as exc:
            if exc.code in self.requeue_codes:
                raise Requeue(str(exc)) from exc
            raise
        st.prefault_ms = ready.prefault_ms

        job.tracker.set_phase(expected=P.SETUP, new=P.PRECOPY)
        dirty = DirtyMap(ram.dirty)
        dirty.collect()                                 # start tracking: everything is sent below
        self._bw_t0 = time.monotonic()
        self._thr_t, self._thr_writes, self._thr_bytes, self._thr_over = time.monotonic(), int(vm.ctl.writes), 0, 0
        t_round = time.monotonic()
        sent = await self._send_full_pass()
        await self._end_round(1, sent, dirty, t_round)

        history: list[int] = [vm.record.memory_bytes, st.remaining_bytes]
        while True:
            decision = convergence.should_complete(convergence.RoundFacts(
                round=st.rounds, remaining_bytes=st.remaining_bytes,
                bandwidth_bps=st.bandwidth_bps, downtime_target_ms=self.downtime_target_ms,
                max_rounds=mcfg.max_rounds, throttle_pct=st.throttle_pct,
                remaining_history=tuple(history[:-1]),
            ))
            if decision is not convergence.Decision.ITERATE:
                st.convergence = decision.value
                # Let the destination catch up before the pause: its backlog
                # (socket buffers, our write buffer) would otherwise be downtime.
                await self._wait_round_ack(st.rounds)
                break
            t_round = time.monotonic()
            runs = dirty.collect()
            st.dirty_syncs += 1
            sent = await self._send_runs(runs, st.rounds + 1)
            await self._end_round(st.rounds + 1, sent, dirty, t_round)
            history.append(st.remaining_bytes)
            self._throttle_check(force=True)

        # ---- stop-and-copy: the guest is paused from here until the destination resumes
        job.tracker.set_phase(expected=P.PRECOPY, new=P.STOP_AND_COPY)
        st.guest_rate_during_pps = int(vm.ctl.rate_pps)
        vm.record.state = "paused"           # a restart must not resume a VM that may run elsewhere
        host.registry.save(vm)               # (durable before the pause, so not part of it)
        self.t_pause = time.monotonic()
        await vm.pause(mcfg.guest_ack_timeout_s)
        st.writes_at_pause = int(vm.ctl.writes)
        runs = dirty.collect()
        st.dirty_syncs += 1
        t_round = time.monotonic()
        sent = await self._send_runs(runs, st.rounds + 1)
        st.stop_copy_pages = sent
        await self._end_round(st.rounds + 1, sent, dirty, t_round)
        device_state = msgpack.packb({"vm": vm.name, "memory_bytes": vm.record.memory_bytes,
                                      "workload": vm.record.workload})
        await conn.send(StateTransfer(vcpu_state=vm.ctl.vcpu_state(), device_state=device_state))

        # ---- resume on the destination at once; verify while it runs
        job.tracker.set_phase(expected=P.STOP_AND_COPY, new=P.RESUME)
        self.resume_sent = True
        await conn.send(Resume(migration_id=job.id))
        resumed = await conn.expect(Resumed, mcfg.io_timeout_s)
        st.downtime_ms = (time.monotonic() - self.t_pause) * 1000.0
        st.writes_after_resume = resumed.writes
        log.info("destination_resumed", downtime_ms=round(st.downtime_ms, 1), writes=resumed.writes)

        # ---- verify: the frozen source against what the destination held at resume.
        # Hashing starts only now: on a 2-core host it would slow the destination's
        # last steps, which are downtime.
        job.tracker.set_phase(expected=P.RESUME, new=P.VERIFY)
        t_verify = time.monotonic()
        chunk_pages = digest_chunk_pages(ram.npages)
        src_task = asyncio.create_task(
            asyncio.to_thread(chunk_digests, ram.ram, chunk_pages, ram.next_data_page, ram.next_hole_page))
        try:
            theirs = await conn.expect(Digests, mcfg.io_timeout_s)
        finally:
            ours = await src_task
        st.verify_ms = (time.monotonic() - t_verify) * 1000.0
        if theirs.chunk_pages != chunk_pages or len(theirs.digests) != len(ours):
            self.verify_failed = True
            raise MigrationAborted("verify", "destination digests do not cover the same memory")
        bad = diff_chunks(ours, theirs.digests)
        if bad:
            self.verify_failed = True
            log.error("verify_failed", chunks=len(bad), first_chunk=bad[0])
            raise MigrationAborted("verify", f"{len(bad)} memory chunk(s) differ (first at page {bad[0] * chunk_pages})")
        job.verified = True
        log.info("verified", chunks=len(ours) // 16, verify_ms=round(st.verify_ms, 1))
        await self._commit()

    async def _commit(self) -> None:
        job, vm, conn = self.job, self.vm, self.conn
        job.tracker.set_phase(expected=(P.RESUME, P.VERIFY), new=P.COMMIT)
        if conn is not None:
            try:
                await conn.send(Commit(migration_id=job.id))
                await conn.expect(Committed, self.host.cfg.migration.io_timeout_s)
            except (AgentError, ProtocolError) as exc:
                # The destination owns the VM from Resume on; a lost Committed changes nothing.
                log.warning("commit_ack_lost", error=str(exc))
            conn.close()
        await self._release_source()
        job.tracker.set_phase(expected=P.COMMIT, new=P.COMPLETED)
        log.info("migration_completed", **{k: v for k, v in job.report().items()
                                           if k in ("total_ms", "downtime_ms", "iterations", "pages_sent", "bytes_sent")})

    async def _release_source(self) -> None:
        vm = self.vm
        await vm.stop_guest(self.host.cfg.migration.guest_ack_timeout_s)
        if self.conn is not None:
            await self.conn.wait_closed()       # the transport may still hold views of the segment
        vm.release()
        self.host.registry.remove(vm)
        vm.migrating = None

    # ---- sending pages ---------------------------------------------------
    async def _send_full_pass(self) -> int:
        """Round 1: every page, in 4 MiB chunks, coldest chunk first (heat.py).
        A chunk that is a hole of the segment (never written) is found with
        SEEK_DATA and announced as zero without being read; other chunks are
        scanned and their zero granules announced, not sent."""
        ram = self.vm.ram
        npages = ram.npages
        zero: list[tuple[int, int]] = []
        zero_pages = 0
        sent = 0
        nb = 0

        def add_zero(first: int, count: int) -> None:
            nonlocal zero_pages
            if zero and zero[-1][0] + zero[-1][1] == first:
                zero[-1] = (zero[-1][0], zero[-1][1] + count)
            else:
                zero.append((first, count))
            zero_pages += count

        st = self.job.stats
        order = self.vm.heat.order() if self.vm.heat.samples else range(self.vm.heat.nchunks)
        cp = self.vm.heat.chunk_pages
        done = 0
        for c in order:
            first = c * cp
            count = min(cp, npages - first)
            st.remaining_bytes = (npages - done) * PAGE_SIZE      # progress within round 1
            done += count
            if ram.next_data_page(first) >= first + count:          # a hole: never written
                add_zero(first, count)
                data_runs = ()
            else:
                data_runs, zero_runs = split_zero(ram.ram, PageRun(first, count))
                for r in zero_runs:
                    add_zero(r.first, r.count)
            if zero_pages >= ZERO_BATCH_PAGES or len(zero) >= BATCH_RUNS:
                await self._send_zero(zero, 1)
                zero, zero_pages = [], 0
            if data_runs:
                for chunk in batches(((r.first, r.count) for r in data_runs), FULL_PASS_PAGES, BATCH_RUNS):
                    sent += await self._send_batch(chunk, 1)
            nb += 1
            if nb % YIELD_EVERY_BATCHES == 0:
                await asyncio.sleep(0)
        if zero:
            await self._send_zero(zero, 1)
        return sent

    async def _send_zero(self, runs, round_no: int) -> None:
        for chunk in batches(runs, ZERO_BATCH_PAGES, BATCH_RUNS):
            msg = PageBatch(round=round_no, runs=tuple(chunk), flags=BatchFlags.ZERO, payload_len=0)
            await self.conn.send(msg, timeout_s=self.host.cfg.migration.io_timeout_s)
            n = sum(c for _, c in chunk)
            self.job.stats.zero_pages += n
            self.job.stats.wire_bytes += 64

    async def _send_runs(self, runs, round_no: int) -> int:
        sent = 0
        for i, chunk in enumerate(batches((tuple(r) for r in runs))):
            sent += await self._send_batch(chunk, round_no)
            if i % YIELD_EVERY_BATCHES == YIELD_EVERY_BATCHES - 1:
                await asyncio.sleep(0)
        return sent

    async def _send_batch(self, runs: list[tuple[int, int]], round_no: int) -> int:
        ram = self.vm.ram.ram
        pages = sum(c for _, c in runs)
        nbytes = pages * PAGE_SIZE
        views = [ram[f * PAGE_SIZE:(f + c) * PAGE_SIZE] for f, c in runs]
        msg = PageBatch(round=round_no, runs=tuple(runs), flags=BatchFlags.NONE, payload_len=nbytes)
        try:
            await self.conn.send(msg, views, timeout_s=self.host.cfg.migration.io_timeout_s)
        finally:
            views.clear()      # a traceback kept by a cancelled task must not pin the segment
        st = self.job.stats
        st.pages_sent += pages
        st.bytes_sent += nbytes
        st.wire_bytes += nbytes + 16 + 8 * len(runs) + 16
        self.meter.add(nbytes)
        if self.max_bandwidth_bps:
            await self._rate_limit(nbytes)
        if self.host.bandwidth is not None:
            await self.host.bandwidth.consume(nbytes)
        self._throttle_check()
        return pages

    def _throttle_check(self, force: bool = False) -> None:
        """Auto-converge, once per period (also inside a long round)."""
        now = time.monotonic()
        period = now - self._thr_t
        if period < convergence.THROTTLE_PERIOD_S and not force:
            return
        if period <= 0.05:
            return
        ctl = self.vm.ctl
        writes = int(ctl.writes)
        dirty_bps = (writes - self._thr_writes) * PAGE_SIZE / period
        bw = (self.meter.total - self._thr_bytes) / period
        self._thr_t, self._thr_writes, self._thr_bytes = now, writes, self.meter.total
        st = self.job.stats
        st.dirty_rate_pps = dirty_bps / PAGE_SIZE
        if bw > 0:
            st.bandwidth_bps = bw            # live figure; a finished round sets its own
        new_pct, self._thr_over = convergence.next_throttle(st.throttle_pct, dirty_bps, bw, self._thr_over)
        if new_pct != st.throttle_pct:
            st.throttle_pct = new_pct
            ctl.throttle_pct = new_pct
            log.info("auto_converge_throttle", throttle_pct=new_pct, dirty_mbps=round(dirty_bps * 8 / 1e6, 1),
                     link_mbps=round(bw * 8 / 1e6, 1))

    async def _rate_limit(self, nbytes: int) -> None:
        self._bw_bytes += nbytes
        due = self._bw_t0 + self._bw_bytes / self.max_bandwidth_bps
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _wait_round_ack(self, round_no: int) -> None:
        t0 = time.monotonic()
        while True:
            ack = await self.conn.expect(RoundAck, self.host.cfg.migration.io_timeout_s)
            if ack.round >= round_no:
                break
        log.info("round_acked", round=round_no, wait_ms=round((time.monotonic() - t0) * 1000.0, 1))

    async def _end_round(self, round_no: int, sent_pages: int, dirty: DirtyMap, t_start: float) -> None:
        st = self.job.stats
        elapsed = max(time.monotonic() - t_start, 1e-6)
        dirty_pages = dirty.count()
        await self.conn.send(RoundEnd(round=round_no, pages_sent=sent_pages, dirty_pages=dirty_pages))
        st.rounds = round_no
        round_bps = sent_pages * PAGE_SIZE / elapsed
        # Bandwidth: this round's rate when it moved enough bytes to be meaningful, else the meter.
        if sent_pages * PAGE_SIZE >= 4 * 2**20 or st.bandwidth_bps == 0:
            st.bandwidth_bps = round_bps if sent_pages else self.meter.rate()
        st.remaining_bytes = dirty_pages * PAGE_SIZE
        st.expected_downtime_ms = convergence.expected_downtime_ms(st.remaining_bytes, st.bandwidth_bps)
        st.round_log.append({
            "round": round_no, "pages_sent": sent_pages, "dirty_pages": dirty_pages,
            "ms": round(elapsed * 1000.0, 1), "bandwidth_bps": round(round_bps),
            "throttle_pct": st.throttle_pct,
        })
        log.info("round_finished", round=round_no, pages_sent=sent_pages, dirty_pages=dirty_pages,
                 elapsed_ms=round(elapsed * 1000.0, 1), mbps=round(round_bps * 8 / 1e6, 1),
                 expected_downtime_ms=round(st.expected_downtime_ms, 1))

    # ---- failure -----------------------------------------------------------
    async def _rollback(self, reason: str, cancelled: bool = False) -> None:
        job, vm = self.job, self.vm
        phase = job.phase
        if phase in (P.COMPLETED, P.FAILED, P.CANCELLED):
            return
        outcome = ""
        if phase is P.COMMIT:
            # Past the point of no return: the destination runs the VM. Finish the release.
            log.error("commit_cleanup_failed", error=reason)
            job.error = f"commit cleanup: {reason}"
            try:
                await self._release_source()
            finally:
                job.tracker.set_phase(expected=P.COMMIT, new=P.COMPLETED)
            return
        if self.resume_sent and phase in (P.RESUME, P.VERIFY):
            if self.verify_failed:
                # Stop the destination's copy, and make sure it is gone before resuming here.
                if self.conn is not None:
                    await self.conn.abort(ErrorCode.VERIFY_FAILED, reason)
                    await self.conn.wait_closed()
                outcome = await self._resolve_in_doubt()
                if outcome == "running":
                    outcome = "unknown"
                    reason = f"{reason}; the destination still runs its copy"
            else:
                # Resumed arrived (VERIFY): the destination runs the VM and keeps it.
                # Lost before that (RESUME): close this connection (the destination
                # answers "in-progress" while it still waits on it), then ask.
                if phase is P.RESUME and self.conn is not None:
                    self.conn.close()
                    await self.conn.wait_closed()
                outcome = "running" if phase is P.VERIFY else await self._resolve_in_doubt()
                if outcome == "running":
                    log.warning("committed_unverified", error=reason)
                    if not self.job.stats.downtime_ms:
                        self.job.stats.downtime_ms = (time.monotonic() - self.t_pause) * 1000.0
                    if self.conn is not None:
                        self.conn.close()
                    self.conn = None
                    await self._commit()
                    return
        job.error = reason
        log.warning("migration_rolling_back", phase=phase.value, error=reason)
        if cancelled and phase not in (P.RESUME, P.VERIFY):
            job.tracker.set_phase(expected=phase, new=P.CANCELLING)
        else:
            job.tracker.set_phase(expected=phase, new=P.ROLLING_BACK)
        try:
            if self.resume_sent and outcome == "unknown":
                job.error = f"{reason}; destination state unknown, VM left paused here"
                return
            if self.conn is not None:
                code = ErrorCode.CANCELLED if cancelled else ErrorCode.INTERNAL
                await self.conn.abort(code, reason)
                await self.conn.wait_closed()     # drops the transport's views of the segment
            vm.ctl.throttle_pct = 0
            if vm.record.state == "paused":
                await vm.resume(self.host.cfg.migration.guest_ack_timeout_s)
                vm.record.state = "running"
                self.host.registry.save(vm)
        except VmError as exc:
            log.error("rollback_resume_failed", error=str(exc))
            job.error = f"{reason}; rollback: {exc}"
        finally:
            vm.migrating = None
            if job.phase is P.CANCELLING:
                job.tracker.set_phase(expected=P.CANCELLING, new=P.CANCELLED)
            elif job.phase is P.ROLLING_BACK:
                job.tracker.set_phase(expected=P.ROLLING_BACK, new=P.FAILED)
        log.info("rolled_back", vm_state=vm.state())

    async def _resolve_in_doubt(self) -> str:
        """Resume was sent, Resumed never came: ask the destination what happened.

        Returns "running" (it runs the VM: commit), "discarded" (resume here)
        or "unknown" (unreachable for resolve_timeout_s: keep the frozen copy
        paused rather than risk two running copies).
        """
        mcfg = self.host.cfg.migration
        deadline = time.monotonic() + mcfg.resolve_timeout_s
        delay = 0.05
        while time.monotonic() < deadline:
            try:
                conn, _, _ = await open_session(self.host, self.peer_host, self.peer_port)
                try:
                    await conn.send(Query(migration_id=self.job.id))
                    res = await conn.expect(QueryResult, mcfg.handshake_timeout_s)
                finally:
                    conn.close()
                log.info("in_doubt_query", state=res.state)
                if res.state == "running":
                    return "running"
                if res.state in ("discarded", "unknown"):
                    return "discarded"
            except (AgentError, ProtocolError, OSError) as exc:
                log.warning("in_doubt_query_failed", error=str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        return "unknown"
