"""DestinationMigration: one inbound connection, from Hello to Committed.

    negotiate      admission (name, maintenance, workload, memory and /dev/shm
                   space, a live slot), a job
    setup          the shell: segment, standby guest (paused), each section's
                   setup (RAM: reserve and pre-fault what the source holds)
    precopy        page batches arrive on the data streams (datastream.py), each
                   landing straight in guest memory from its thread (zero copy);
                   a round is acknowledged once every stream delivered it
    stop-and-copy  the vCPU state arrives and is loaded
    verify         each section's digests of what this host holds, guest still
                   paused, go to the source, which compares
    resume         on Resume (sent only after a full match): record ``running``
                   and ``taken`` durably, then RUN the guest, answer Resumed
    commit         Commit -> Committed

Ownership: until Resume the source owns the VM and any failure, timeout or
EOF here discards the shell: the guest never ran, so nothing is lost. From
Resume on this host owns it: the record says ``running`` before the guest
starts (a crash in between is repaired by the restart) and the migration id
is in ``taken-migrations`` (so a query answers ``running``). Nothing after
Resume discards it.
"""
from __future__ import annotations

import asyncio
import os
import time

import msgpack
import structlog

from memstore import Cmd, SegmentError
from protocol import (
    Abort,
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
    Reject,
    RemoteProtocolError,
    Resume,
    Resumed,
    RoundAck,
    RoundEnd,
    SectionState,
    StateTransfer,
    encode_frame,
)

from agent.daemon.config import NAME_RE
from agent.daemon.host import Host
from agent.daemon.vm import Vm, VmRecord, check_workload
from agent.errors import AdmissionRefused, AgentError, PeerLost, VmError
from agent.migration import testhooks
from agent.migration.jobs import Job
from agent.migration.phases import MigrationPhase as P, gc_paused, log_phase_change
from agent.migration.catalog import SECTIONS
from agent.migration.section import IncomingSection
from agent.net.accept import accept
from agent.net.datastream import InboundStreams
from agent.net.transport import FrameProtocol
from agent.observe.logs import get_logger

log = get_logger("livemig.destination")

REASON_CHARS = 1000
# Fault injection for tests only (environment, never config): "corrupt-page"
# flips a byte of page 0 after the last round and tells the digests, as a
# receive-path bug would; "corrupt-unmarked" flips it without telling them
# (only verify=full can see it); "lose-resumed" drops the connection after
# the guest resumed, before Resumed.
FAULT_INJECT = os.environ.get("LIVEMIG_FAULT_INJECT", "")
MAX_GUEST_COUNTER = 2**62
DRY_RUN = "dry-run"              # a Prepare feature: admission only (migrate --dry-run)        # far beyond any real run; far enough from 2**64 to keep counting


def _paused_ms(device_state: bytes) -> float:
    """The source's pause so far when it sent StateTransfer (0 if it did not say)."""
    try:
        d = msgpack.unpackb(device_state, raw=False, max_map_len=16, max_str_len=256)
        v = d.get("paused_ms", 0.0) if isinstance(d, dict) else 0.0
    except Exception:      # a malformed blob only costs this figure
        return 0.0
    return float(v) if isinstance(v, (int, float)) and 0 <= v < 3.6e6 else 0.0


class DestinationMigration:
    def __init__(self, host: Host, conn: FrameProtocol) -> None:
        self.host = host
        self.conn = conn
        self.job: Job | None = None
        self.vm: Vm | None = None
        self.sections: list[IncomingSection] = []
        self.owned = False          # True from Resume on: never discarded after that
        self.slot = False
        self.reserved_name: str | None = None
        self._t_round = self._t_state = 0.0        # this side's clocks for its own figures
        self._acker: asyncio.Future | None = None  # the latest pending RoundAck
        self.streams: InboundStreams | None = None
        self._standby: int | None = None           # the standby guest's PAUSE ack, until seen
        self._source_paused_ms = 0.0

    # ---- entry -------------------------------------------------------------
    async def run(self) -> None:
        try:
            prepare = await self._handshake()
            if prepare is not None:
                await self._migrate(prepare)
        except asyncio.CancelledError:
            await asyncio.shield(self._fail("cancelled (agent shutting down)", ErrorCode.CANCELLED))
            raise
        except ProtocolError as exc:
            log.warning("peer_protocol_error", peer=self.conn.peer, error=str(exc), code=exc.code.name)
            await asyncio.shield(self._fail(str(exc), exc.code))
        except AdmissionRefused as exc:
            log.warning("admission_refused", peer=self.conn.peer, reason=str(exc))
            await asyncio.shield(self._fail(str(exc), ErrorCode(exc.code or ErrorCode.BUSY), reject=True))
        except (AgentError, OSError, TimeoutError) as exc:
            log.warning("inbound_failed", peer=self.conn.peer, error=str(exc) or type(exc).__name__)
            await asyncio.shield(self._fail(str(exc) or type(exc).__name__, ErrorCode.INTERNAL))
        except Exception as exc:
            log.exception("inbound_internal_error", peer=self.conn.peer)
            await asyncio.shield(self._fail(f"internal error: {exc!r}", ErrorCode.INTERNAL))
        finally:
            await self._release_admission()

    def _unadmit(self) -> None:
        if self.slot:
            self.host.slots.release()
            self.slot = False
        if self.reserved_name is not None:
            self.host.registry.reserved.pop(self.reserved_name, None)
            self.reserved_name = None

    async def _release_admission(self) -> None:
        self._unadmit()
        if self.vm is not None:
            if self._guest_lost in self.vm.on_guest_lost:
                self.vm.on_guest_lost.remove(self._guest_lost)
            if self.owned:
                self.vm.migrating = None
        if self.job is not None and not self.job.done.is_set():
            self.job.finish()
        await self.conn.wait_closed()

    async def _enter(self, expected, new: P) -> None:
        self.job.tracker.set_phase(expected=expected, new=new)
        await testhooks.hold(self.host.cfg.agent.data_dir, "destination", new.value, self.job.id)

    # ---- handshake ---------------------------------------------------------
    async def _handshake(self) -> Prepare | None:
        accepted = await accept(self.host, self.conn)
        if accepted is None:
            return None
        msg = accepted.request
        if isinstance(msg, Query):
            await self.conn.send(QueryResult(migration_id=msg.migration_id, state=self._query(msg.migration_id)))
            return None
        self.agreement = accepted.agreement
        self.peer_agent = accepted.hello.agent
        return msg

    def _query(self, migration_id: str) -> str:
        """running: this host took the VM (durable, survives restarts and onward
        moves); in-progress: still deciding; discarded: had it, dropped it;
        unknown: never took it. Only "running" means a copy runs here."""
        job = self.host.jobs.get(migration_id)
        if self.host.was_taken(migration_id) or any(
                v.record.migration_id == migration_id and v.record.state != "incoming" for v in self.host.registry):
            return "running"
        if job is not None and not job.done.is_set():
            return "in-progress"
        return "discarded" if job is not None else "unknown"

    # ---- the phases, in order -------------------------------------------
    async def _migrate(self, p: Prepare) -> None:
        with structlog.contextvars.bound_contextvars(migration_id=p.migration_id, vm=p.vm, role="destination",
                                                     peer=self.peer_agent):
            if DRY_RUN in p.features:
                await self._dry_run(p)
                return
            await self._negotiate(p)
            await self._setup(p)
            state = await self._precopy()
            with gc_paused():                 # the source's guest is paused until our Resumed
                await self._stop_and_copy(state)
                await self._verify(p.verify_mode)
                await self._resume()
            await self._commit()

    async def _negotiate(self, p: Prepare) -> None:
        self._admit(p)          # refusals leave no job behind: the source requeues or fails
        try:                    # each section's admission check, before anything is built
            SECTIONS.check_incoming(p.sections)
            SECTIONS.probe(p.sections, self._setup_infos(p), self.host)
        except BaseException:
            self._unadmit()
            raise
        host = self.host
        job = Job(vm=p.vm, source=p.source, destination=host.name, direction="inbound", job_id=p.migration_id)
        job.slots = self.agreement.slots
        job.started_at = time.time()
        job.peer_agent = self.peer_agent
        job.stats.verify_mode = p.verify_mode
        self.job = host.jobs.add(job)
        job.tracker.on_change(log_phase_change)
        await self._enter(P.QUEUED, P.NEGOTIATE)

    async def _dry_run(self, p: Prepare) -> None:
        """migrate --dry-run: every admission check, then Ready; nothing is
        created, and the slot and the reservation go at once."""
        self._admit(p)
        SECTIONS.check_incoming(p.sections)
        SECTIONS.probe(p.sections, self._setup_infos(p), self.host)
        await self.conn.send(Ready(migration_id=p.migration_id, prefault_ms=0,
                                   streams=max(1, min(p.streams, self.host.cfg.migration.data_streams())),
                                   token=bytes(16)))     # no stream will join a dry run
        log.info("dry_run_admitted", peer=self.conn.peer)

    def _admit(self, p: Prepare) -> None:
        host = self.host
        if NAME_RE.fullmatch(p.migration_id) is None:
            raise AdmissionRefused(f"bad migration id {p.migration_id[:80]!r}", ErrorCode.MALFORMED)
        if host.jobs.get(p.migration_id) is not None or host.was_taken(p.migration_id):
            raise AdmissionRefused(f"migration id {p.migration_id!r} is already known here", ErrorCode.UNEXPECTED)
        if NAME_RE.fullmatch(p.vm) is None:
            raise AdmissionRefused(f"bad VM name {p.vm!r}", ErrorCode.INCOMPATIBLE)
        if host.maintenance:
            raise AdmissionRefused(f"host {host.name} is in maintenance and accepts no VMs", ErrorCode.MAINTENANCE)
        if p.vm in host.registry:
            raise AdmissionRefused(f"a VM named {p.vm!r} already exists on {host.name}", ErrorCode.VM_EXISTS)
        try:
            check_workload(p.workload, p.memory_bytes)
        except AgentError as exc:
            raise AdmissionRefused(f"cannot run this VM here: {exc}", ErrorCode.INCOMPATIBLE) from exc
        available = host.memory_available()
        if p.memory_bytes > available:
            raise AdmissionRefused(
                f"not enough memory on {host.name}: VM needs {p.memory_bytes / 2**20:.0f} MiB, "
                f"{available / 2**20:.0f} MiB available (memory and {host.shm_dir()})", ErrorCode.NO_MEMORY)
        if not host.slots.try_acquire():
            raise AdmissionRefused(
                f"{host.name} runs {host.slots.in_use} of {host.slots.limit} live migrations", ErrorCode.BUSY)
        self.slot = True
        # Held until the memory is allocated (end of setup), so two admissions
        # cannot both count the same free memory.
        host.registry.reserved[p.vm] = p.memory_bytes
        self.reserved_name = p.vm

    async def _setup(self, p: Prepare) -> None:
        host, job, mcfg = self.host, self.job, self.host.cfg.migration
        await self._enter(P.NEGOTIATE, P.SETUP)
        t0 = time.monotonic()
        infos = self._setup_infos(p)
        vm_id = Vm.new_id()
        ram = host.registry.create_segment(p.vm, vm_id, p.memory_bytes)
        rec = VmRecord(name=p.vm, id=vm_id, memory_bytes=p.memory_bytes, workload=p.workload,
                       segment=ram.name, state="incoming", migration_id=job.id)
        self.vm = Vm(rec, ram)
        host.registry.add(self.vm)
        self.vm.on_guest_lost.append(self._guest_lost)
        # Standby guest: launched paused now, so the interpreter start-up
        # (~60 ms) overlaps the transfer instead of adding to the downtime.
        ram.ctl.workload = p.workload
        standby_seq = ram.ctl.command(Cmd.PAUSE)
        self.vm.start_guest(host.guest_log(p.vm))
        host.registry.save(self.vm)
        try:
            self.sections = SECTIONS.build_incoming(p.sections, vm=self.vm, host=host)
            for s, info in zip(self.sections, infos):
                await s.setup(info)
        except SegmentError as exc:      # e.g. /dev/shm full: a clear refusal, never a signal
            raise AdmissionRefused(f"{host.name}: {exc}", ErrorCode.NO_MEMORY) from exc
        finally:
            # The reservation is held until the memory is allocated (pre-fault done).
            host.registry.reserved.pop(p.vm, None)
            self.reserved_name = None
        job.stats.prefault_ms = (time.monotonic() - t0) * 1000.0
        job.stats.ram_bytes = p.memory_bytes
        job.stats.pages_total = ram.npages
        # The standby guest's start-up (~60 ms) overlaps round 1: its ack is
        # awaited before the first RoundAck, so never inside the pause.
        self._standby = standby_seq
        n = max(1, min(p.streams, mcfg.data_streams()))
        self.streams = InboundStreams(job.id, n, self.conn.peer_name, sink=self._stream_sink,
                                      apply=self._stream_apply, check_batch=self._stream_check,
                                      on_batch=self._stream_batch, on_failure=self._stream_failed,
                                      hold=testhooks.stream_hold())
        host.inbound_streams[job.id] = self.streams
        job.stats.streams = n
        await self.conn.send(Ready(migration_id=job.id, prefault_ms=int(job.stats.prefault_ms), streams=n,
                                   token=self.streams.token))
        log.info("shell_ready", prefault_ms=round(job.stats.prefault_ms, 1), memory_bytes=p.memory_bytes,
                 streams=n, prefault=mcfg.prefault)

    # ---- the data streams' callbacks (datastream.InboundStreams) -------------
    def _stream_check(self, batch: PageBatch) -> None:          # stream thread
        self._section(batch.section)

    def _stream_sink(self, batch: PageBatch):                   # stream thread
        return self._section(batch.section).payload_sink(batch)

    def _stream_apply(self, batch: PageBatch) -> None:          # stream thread
        self._section(batch.section).apply_in_stream(batch)

    def _stream_batch(self, batch: PageBatch) -> None:          # loop
        self._section(batch.section).on_batch(batch)
        self._count_batch(batch)

    def _stream_failed(self, exc: BaseException) -> None:       # loop
        """A data stream failed: the migration fails like a lost connection;
        a protocol error or a full /dev/shm is told to the source first."""
        conn = self.conn
        code = (exc.code if isinstance(exc, ProtocolError) else
                ErrorCode.NO_MEMORY if isinstance(exc, SegmentError) else None)
        tr = conn.transport
        if code is not None and tr is not None and not tr.is_closing():
            tr.write(encode_frame(Abort(code=code, reason=f"data stream: {exc}"[:REASON_CHARS])))
        if isinstance(exc, (ProtocolError, AgentError)):
            conn.fail(exc)
        else:
            conn.fail(AgentError(f"{self.host.name}: data stream: {exc}"))

    def _setup_infos(self, p: Prepare) -> list[dict]:
        try:
            infos = msgpack.unpackb(p.setup, raw=False, strict_map_key=True, max_bin_len=4 * 2**20)
        except Exception as exc:
            raise RemoteProtocolError(f"Prepare.setup does not decode: {exc}", ErrorCode.MALFORMED) from None
        if not isinstance(infos, list) or len(infos) != len(p.sections) or not all(isinstance(i, dict) for i in infos):
            raise RemoteProtocolError("Prepare.setup must hold one map per section", ErrorCode.MALFORMED)
        return infos

    def _section(self, section_id: int) -> IncomingSection:
        if section_id >= len(self.sections):
            raise RemoteProtocolError(f"no section {section_id} in this migration", ErrorCode.MALFORMED)
        return self.sections[section_id]

    def _guest_lost(self, vm: Vm, reason: str) -> None:
        """Our standby guest died. Before Resume: fail the migration (the
        source resumes its copy). After Resume the VM is ours: restart it."""
        if not self.owned:
            self.conn.fail(VmError(f"standby guest of {vm.name} died: {reason}"))

    async def _precopy(self) -> StateTransfer:
        await self._enter(P.SETUP, P.PRECOPY)
        conn = self.conn
        self._t_round = time.monotonic()
        timeout = self.host.cfg.migration.io_timeout_s
        streams = self.streams
        while True:
            # Pages arrive on the data streams: their progress keeps this wait alive.
            msg = await conn.recv(timeout, progress=streams.bytes_received)
            if isinstance(msg, RoundEnd):
                self._round_ended(msg)
                self._ack_round(msg.round)
            elif isinstance(msg, SectionState):
                self._section(msg.section).on_state(msg.data)
            elif isinstance(msg, StateTransfer):
                return msg
            else:  # the session allows nothing else here
                raise RemoteProtocolError(f"unexpected {type(msg).__name__}", ErrorCode.UNEXPECTED)

    def _count_batch(self, msg: PageBatch) -> None:
        """This side's own view of the transfer (jobs, report, picture)."""
        st = self.job.stats
        if msg.payload_len:
            st.pages_sent += msg.pages
            st.bytes_sent += msg.payload_len
        else:
            st.zero_pages += msg.pages
        if msg.round == 1:      # until the first RoundEnd: what round 1 has not delivered yet
            st.remaining_bytes = max(0, st.pages_total - st.pages_sent - st.zero_pages) * 4096

    def _ack_round(self, round_no: int) -> None:
        """RoundAck once every data stream delivered its RoundEnd of this
        round (all of its pages are in guest memory) and they are hashed,
        without holding up the receive loop; acks go out in round order."""
        previous = self._acker
        timeout = self.host.cfg.migration.io_timeout_s

        async def ack() -> None:
            if previous is not None:
                await previous
            try:
                await self.streams.reached(round_no, timeout)
                if self._standby is not None:
                    await self.vm.wait_ack(self._standby, self.host.cfg.migration.guest_ack_timeout_s)
                    self._standby = None
                for s in self.sections:
                    await s.settle()
                await self.conn.send(RoundAck(round=round_no))
            except (AgentError, ProtocolError) as exc:
                self.conn.fail(exc)        # the receive loop raises it: a missing ack must not stall the source
                raise
        self._acker = asyncio.ensure_future(ack())

    def _round_ended(self, msg: RoundEnd) -> None:
        st, now = self.job.stats, time.monotonic()
        t0, self._t_round = self._t_round, now
        st.rounds = msg.round
        st.remaining_bytes = msg.dirty_pages * 4096
        st.round_log.append({"round": msg.round, "pages_sent": msg.pages_sent, "dirty_pages": msg.dirty_pages,
                             "ms": round((now - t0) * 1000.0, 1)})

    async def _stop_and_copy(self, state: StateTransfer) -> None:
        await self._enter(P.PRECOPY, P.STOP_AND_COPY)
        self._t_state = time.monotonic()
        mcfg = self.host.cfg.migration
        # Every stream's last round is in memory before anything is hashed or loaded.
        await self.streams.reached(self.job.stats.rounds, mcfg.io_timeout_s)
        await self._stop_acker(cancel=False)      # the last ack: hashing it waits for is needed anyway
        await self._close_streams()
        if self._standby is not None:             # a source that never waited for a RoundAck
            await self.vm.wait_ack(self._standby, mcfg.guest_ack_timeout_s)
            self._standby = None
        self._source_paused_ms = _paused_ms(state.device_state)
        ctl = self.vm.ctl
        try:
            ctl.load_vcpu_state(state.vcpu_state)
        except SegmentError as exc:
            raise RemoteProtocolError(f"bad vCPU state: {exc}", ErrorCode.MALFORMED) from None
        # The state must be the VM's that Prepare announced: its workload, and
        # counters a guest can keep counting (a u64 near its end would stop it).
        if ctl.workload != self.vm.record.workload:
            raise RemoteProtocolError(f"vCPU state runs workload {ctl.workload!r}, the VM is "
                                      f"{self.vm.record.workload!r}", ErrorCode.MALFORMED)
        if ctl.writes > MAX_GUEST_COUNTER or ctl.io_writes > MAX_GUEST_COUNTER:
            raise RemoteProtocolError("vCPU state write counter out of range", ErrorCode.MALFORMED)
        if FAULT_INJECT == "corrupt-page":            # test hook: a wrong page the digests are told about
            self.vm.ram.ram[0] ^= 0xFF
            self.sections[0].digest.mark(((0, 1),))
        elif FAULT_INJECT == "corrupt-unmarked":      # ... and one they are not (the last page: outside any hot set)
            self.vm.ram.ram[-1] ^= 0xFF

    async def _verify(self, mode: str) -> None:
        """Digests of what this host holds, guest still paused; the source compares."""
        await self._enter(P.STOP_AND_COPY, P.VERIFY)
        t0 = time.monotonic()
        for s in self.sections:
            t1 = time.monotonic()
            chunk_pages, digests = await s.digests(mode)
            t2 = time.monotonic()
            await self.conn.send(Digests(section=s.section_id, chunk_pages=chunk_pages, digests=digests))
            log.debug("section_digests_sent", section=s.NAME, hash_ms=round((t2 - t1) * 1000, 2),
                      send_ms=round((time.monotonic() - t2) * 1000, 2))
        self.job.stats.verify_ms = (time.monotonic() - t0) * 1000.0

    async def _resume(self) -> None:
        host, job, vm, mcfg = self.host, self.job, self.vm, self.host.cfg.migration
        await self.conn.expect(Resume, mcfg.io_timeout_s)    # sent only after the source's digests matched
        await self._enter(P.VERIFY, P.RESUME)
        for s in self.sections:
            await s.activate()
        job.verified = True
        # Ownership first, durably: the record saved as running (with this
        # migration id) is the proof, before the guest runs; a crash in between
        # is repaired by the restart, and a query answers "running" from it.
        vm.record.state = "running"
        try:
            host.registry.save(vm)
        except OSError:
            vm.record.state = "incoming"          # not durable: not ours, discard as before Resume
            raise
        self.owned = True
        try:
            host.taken(job.id)                    # the index that outlives the record (VM moved on)
        except OSError as exc:
            log.error("taken_index_not_written", error=str(exc), note="the running record answers queries")
        vm.migrating = job.id                     # not movable onward until this migration has ended
        await self._run_guest()
        writes = int(vm.ctl.writes)
        job.stats.writes_after_resume = writes
        # The downtime as this side saw it: the source's pause until its
        # StateTransfer left, plus our time from its arrival to the guest running.
        job.stats.downtime_ms = self._source_paused_ms + (time.monotonic() - self._t_state) * 1000.0
        if FAULT_INJECT == "lose-resumed":        # test hook: the link dies right after the resume
            self.conn.fail(PeerLost("fault injection: connection lost after resume"))
            self.conn.transport.abort()
        await self.conn.send(Resumed(writes=writes))

    async def _run_guest(self) -> None:
        vm, mcfg = self.vm, self.host.cfg.migration
        try:
            await vm.resume(mcfg.guest_ack_timeout_s)
        except VmError as exc:
            # The standby guest died: the VM is ours, so start a new guest from
            # the state in its segment (as a restart would) rather than lose it.
            log.error("standby_guest_lost", error=str(exc))
            await vm.restart_guest(self.host.guest_log(vm.name), mcfg.guest_ack_timeout_s, run=True)
            self.host.registry.save(vm)

    async def _commit(self) -> None:
        await self._enter(P.RESUME, P.COMMIT)
        try:
            await self.conn.expect(Commit, self.host.cfg.migration.io_timeout_s)
            await self.conn.send(Committed())
        except (AgentError, ProtocolError) as exc:
            log.warning("commit_not_received", error=str(exc))     # ours anyway since Resume
        await self._cleanup_sections(committed=True)
        self.job.tracker.set_phase(expected=P.COMMIT, new=P.COMPLETED)
        self.job.finish()
        log.info("inbound_completed", writes=self.job.stats.writes_after_resume)

    # ---- failure -----------------------------------------------------------
    async def _fail(self, reason: str, code: ErrorCode, reject: bool = False) -> None:
        if self.owned:
            await self._fail_owned(reason)
            return
        job, cancelled = self.job, code == ErrorCode.CANCELLED
        if job is not None and job.phase not in (P.COMPLETED, P.FAILED, P.CANCELLED, P.CANCELLING, P.ROLLING_BACK):
            job.error = reason       # the abort phase first: a shutdown never cuts a discard short
            job.tracker.set_phase(expected=job.phase, new=P.CANCELLING if cancelled else P.ROLLING_BACK)
        if reject:
            # A refusal comes before Ready: no view of the shell was handed out,
            # so the shell goes first and the name is free when the source hears.
            await self._discard_shell(close=False)
            try:
                await self.conn.send(Reject(code=code, reason=reason[:REASON_CHARS]))
            except (AgentError, ProtocolError):
                pass
        elif not isinstance(self.conn.failure, PeerLost):
            await self.conn.abort(code, reason)
        await self._discard_shell()
        if job is not None and job.phase in (P.CANCELLING, P.ROLLING_BACK):
            job.tracker.set_phase(expected=job.phase, new=P.CANCELLED if job.phase is P.CANCELLING else P.FAILED)
        log.info("shell_discarded", reason=reason)

    async def _fail_owned(self, reason: str) -> None:
        """After Resume the VM runs here and stays: the source commits, or
        learns by query that this host runs it."""
        log.warning("inbound_error_after_resume", error=reason)
        vm = self.vm
        if vm is not None and not vm.broken and not vm.guest_alive():
            vm.ctl.command(Cmd.RUN)               # ours: the supervisor restarts it from its memory
            vm.guest_wanted = True
        job = self.job
        await self._cleanup_sections(committed=True)
        if job.phase is P.RESUME:
            job.tracker.set_phase(expected=P.RESUME, new=P.COMMIT)
        if job.phase is P.COMMIT:
            job.tracker.set_phase(expected=P.COMMIT, new=P.COMPLETED)

    async def _discard_shell(self, close: bool = True) -> None:
        """Undo the shell (sections, guest, segment, record). ``close=False``
        only before Ready, when no view of the shell was handed out."""
        vm = self.vm
        await self._cleanup_sections(committed=False)
        if vm is None:
            return
        if close:
            self.conn.close()
            # The transport may hold views of the shell; a peer that is gone or
            # frozen never completes a graceful close: give it a second.
            await self.conn.wait_closed(1.0 if self.conn.failure is not None else 5.0)
        await vm.stop_guest(self.host.cfg.migration.guest_ack_timeout_s)
        vm.release()
        self.host.registry.remove(vm)      # record, segment journal entry and guest log
        self.vm = None

    async def _stop_acker(self, cancel: bool = True) -> None:
        acker, self._acker = self._acker, None
        if cancel and acker is not None and not acker.done():
            acker.cancel()
        if acker is not None:
            try:
                await acker
            except (asyncio.CancelledError, Exception):   # e.g. SegmentError from a full /dev/shm
                pass        # a late ack nobody waits for any more; the failure itself is on the connection

    async def _close_streams(self) -> None:
        streams = self.streams
        if streams is not None:
            self.host.inbound_streams.pop(streams.migration_id, None)
            await streams.close()             # its threads write guest memory: joined here
            self.streams = None               # only now: a cleanup cut short closes (again) next time

    async def _cleanup_sections(self, committed: bool) -> None:
        await self._stop_acker()
        await self._close_streams()
        for s in self.sections:
            try:
                await s.cleanup(committed)
            except Exception:
                log.exception("section_cleanup_failed", section=s.NAME)
        self.sections = []
