"""DestinationMigration: one inbound connection, from Hello to Committed.

The destination admits the VM (name free, not in maintenance, a live slot,
memory: psutil's available memory minus what other inbound migrations
reserved), builds an empty shell (segment created and pre-faulted), then
lets the transport write page payloads straight into the shell. After the
source's StateTransfer it hashes what it holds and sends the digests; on
Resume it starts the guest from the shipped vCPU state and answers Resumed.

Ownership: until Resume the source owns the VM and any failure here
discards the shell. From Resume on this host owns it: the record is saved
as running *before* the guest starts, so a crash in between is repaired by
the restart (the guest is restarted from the shell's state) and answered
"running" to the source's in-doubt query.
"""
from __future__ import annotations

import asyncio
import os
import time

import structlog

from memstore import PAGE_SIZE, Cmd, GuestRam
from protocol import (
    Abort,
    Auth,
    BatchFlags,
    Commit,
    Committed,
    Digests,
    ErrorCode,
    Hello,
    MigrationSession,
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
    Role,
    RoundEnd,
    StateTransfer,
    Welcome,
    auth_proof,
    check_proof,
    make_nonce,
    negotiate,
    Capabilities,
)

from agent.daemon.config import NAME_RE
from agent.errors import AdmissionRefused, AgentError, PeerError, PeerLost, VmError
from agent.daemon.host import Host
from agent.migration.jobs import Job
from agent.observe.logs import get_logger
from agent.net.peer import AUTH_FEATURE
from agent.migration.phases import MigrationPhase as P
from agent.migration.verify import ReceiveDigests, digest_chunk_pages
from agent.net.transport import FrameProtocol
from agent.daemon.vm import Vm, VmRecord, check_workload

log = get_logger("livemig.destination")

_ZERO = bytes(64 * PAGE_SIZE)
REASON_CHARS = 1000
# Fault injection for tests only (environment, never config): "corrupt-page"
# flips a byte of page 0 after the last round, as a receive-path bug would;
# "lose-resumed" drops the connection after the guest resumed, before Resumed.
FAULT_INJECT = os.environ.get("LIVEMIG_FAULT_INJECT", "")


class VerifyFailed(AgentError):
    """The source found our memory differs from its frozen copy."""


class DestinationMigration:
    def __init__(self, host: Host, conn: FrameProtocol) -> None:
        self.host = host
        self.conn = conn
        self.job: Job | None = None
        self.vm: Vm | None = None
        self.owned = False          # True from Resume on: discarded after that only on a digest mismatch
        self.slot = False
        self.reserved_name: str | None = None
        self.digests: ReceiveDigests | None = None

    async def run(self) -> None:
        conn = self.conn
        try:
            prepare = await self._handshake()
            if prepare is None:
                return
            await self._migrate(prepare)
        except asyncio.CancelledError:
            await asyncio.shield(self._discard("cancelled (agent shutting down)", ErrorCode.CANCELLED))
            raise
        except VerifyFailed as exc:
            log.error("verify_failed_discarding", error=str(exc))
            await self._discard(str(exc), ErrorCode.VERIFY_FAILED, verify_failed=True)
        except ProtocolError as exc:
            log.warning("peer_protocol_error", peer=conn.peer, error=str(exc), code=exc.code.name)
            await self._discard(str(exc), exc.code)
        except AdmissionRefused as exc:
            log.warning("admission_refused", peer=conn.peer, reason=str(exc))
            await self._discard(str(exc), ErrorCode(exc.code or ErrorCode.BUSY), reject=True)
        except (AgentError, OSError) as exc:
            log.warning("inbound_failed", peer=conn.peer, error=str(exc))
            await self._discard(str(exc), ErrorCode.INTERNAL)
        except Exception as exc:
            log.exception("inbound_internal_error", peer=conn.peer)
            await self._discard(f"internal error: {exc!r}", ErrorCode.INTERNAL)
        finally:
            if self.slot:
                self.host.slots.release()
            if self.reserved_name is not None:
                self.host.registry.reserved.pop(self.reserved_name, None)
            if self.job is not None and not self.job.done.is_set():
                self.job.finish()
            if self.owned and self.vm is not None:
                self.vm.migrating = None
            await conn.wait_closed()

    # ---- handshake ---------------------------------------------------------
    async def _handshake(self) -> Prepare | None:
        host, conn = self.host, self.conn
        t = host.cfg.migration.handshake_timeout_s
        hello = await conn.recv(t)
        assert isinstance(hello, Hello)
        caps = host.capabilities()
        features = caps.features if host.auth_key else caps.features - {AUTH_FEATURE}
        local = Capabilities(caps.version_min, caps.version_max, frozenset(features), caps.max_live_migrations)
        remote = Capabilities(hello.version_min, hello.version_max, frozenset(hello.features), hello.max_live_migrations)
        try:
            agreement = negotiate(local, remote)
            if host.auth_key and AUTH_FEATURE not in agreement.features:
                raise AdmissionRefused("this agent requires authentication (migration.auth_key_file)", ErrorCode.AUTH_FAILED)
        except ProtocolError as exc:
            await conn.send(Reject(code=exc.code, reason=str(exc)[:REASON_CHARS]))
            return None
        except AdmissionRefused as exc:
            await conn.send(Reject(code=ErrorCode(exc.code), reason=str(exc)[:REASON_CHARS]))
            return None
        nonce = make_nonce()
        proof = auth_proof(host.auth_key, "server", hello.nonce, nonce) if AUTH_FEATURE in agreement.features else b""
        if proof:   # before Welcome goes out: the source's Auth may arrive at once
            conn.session.set_auth_required(True)
        await conn.send(Welcome(
            version=agreement.version, agent=host.name, features=tuple(sorted(agreement.features)),
            max_live_migrations=caps.max_live_migrations, slots=agreement.slots, nonce=nonce, proof=proof,
            slots_free=max(0, host.slots.limit - host.slots.in_use), memory_free_bytes=host.memory_available(),
            status="maintenance" if host.maintenance else "accepting",
        ))
        if proof:
            auth = await conn.expect(Auth, t)
            try:
                check_proof(host.auth_key, "client", hello.nonce, nonce, auth.proof)
            except ProtocolError as exc:
                await conn.send(Reject(code=exc.code, reason="authentication failed"))
                return None
        try:
            msg = await conn.recv(t)
        except PeerLost:
            log.debug("probe_answered", peer=conn.peer, source_agent=hello.agent)   # Hello/Welcome/close
            return None
        if isinstance(msg, Query):
            await conn.send(QueryResult(migration_id=msg.migration_id, state=self._query(msg.migration_id)))
            return None
        assert isinstance(msg, Prepare)
        self.agreement = agreement
        self.peer_agent = hello.agent
        return msg

    def _query(self, migration_id: str) -> str:
        job = self.host.jobs.get(migration_id)
        if job is not None and not job.done.is_set():
            return "in-progress"            # still deciding (e.g. discarding after an Abort)
        if self.host.was_taken(migration_id):
            return "running"                # ours since Resume, even if it has moved on since
        for vm in self.host.registry:
            if vm.record.migration_id == migration_id and vm.record.state != "incoming":
                return "running"
        if job is not None:
            return "discarded"
        return "unknown"

    # ---- admission and shell -------------------------------------------
    def _admit(self, p: Prepare) -> None:
        host = self.host
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
                f"{available / 2**20:.0f} MiB available", ErrorCode.NO_MEMORY)
        if not host.slots.try_acquire():
            raise AdmissionRefused(
                f"{host.name} runs {host.slots.in_use} of {host.slots.limit} live migrations", ErrorCode.BUSY)
        self.slot = True
        host.registry.reserved[p.vm] = p.memory_bytes
        self.reserved_name = p.vm

    async def _migrate(self, p: Prepare) -> None:
        host, conn = self.host, self.conn
        mcfg = host.cfg.migration
        with structlog.contextvars.bound_contextvars(migration_id=p.migration_id, vm=p.vm, role="destination",
                                                     peer=self.peer_agent):
            self._admit(p)          # refusals leave no job behind: the source requeues or fails
            job = Job(vm=p.vm, source=p.source, destination=host.name, direction="inbound", job_id=p.migration_id)
            job.slots = self.agreement.slots
            job.started_at = time.time()
            self.job = host.jobs.add(job)
            job.tracker._on_change = lambda o, n, ms: log.info("phase_changed", old=o.value, new=n.value,
                                                               elapsed_ms=round(ms, 1))
            job.tracker.set_phase(expected=P.QUEUED, new=P.NEGOTIATE)
            job.tracker.set_phase(expected=P.NEGOTIATE, new=P.SETUP)
            t0 = time.monotonic()
            vm_id = Vm.new_id()
            seg = host.registry.segment_name(p.vm, vm_id)
            ram = GuestRam.create(seg, p.memory_bytes)
            rec = VmRecord(name=p.vm, id=vm_id, memory_bytes=p.memory_bytes, workload=p.workload,
                           segment=seg, state="incoming", migration_id=job.id)
            self.vm = Vm(rec, ram)
            host.registry.reserved.pop(p.vm, None)
            self.reserved_name = None
            host.registry.add(self.vm)
            # Standby guest: launched paused now, so the interpreter start-up
            # (~60 ms) overlaps the transfer instead of adding to the downtime.
            ram.ctl.workload = p.workload
            self.standby_seq = ram.ctl.command(Cmd.PAUSE)
            self.vm.start_guest(host.guest_log(p.vm))
            host.registry.save(self.vm)
            # Pre-fault only what the source holds data in (holes stay holes:
            # zero pages are announced and cost this host no memory).
            # One pre-fault at a time per host: two in parallel contend for the
            # same cores and page allocator; one overlaps the other's transfer.
            async with host.prefault_lock:
                await asyncio.to_thread(ram.prefault, p.populated)
            # The standby guest must be up (paused) before Ready: its interpreter
            # start-up (~60 ms) would otherwise land in the pause of a VM that
            # transfers faster than that. It also stores its own empty state when
            # it first pauses; the shipped state is loaded only after that.
            await self.vm.wait_ack(self.standby_seq, mcfg.guest_ack_timeout_s)
            job.stats.prefault_ms = (time.monotonic() - t0) * 1000.0
            job.stats.ram_bytes = p.memory_bytes
            job.stats.pages_total = ram.npages
            self.digests = ReceiveDigests(ram.ram, digest_chunk_pages(ram.npages))
            conn.payload_sink = self._sink
            conn.ack_rounds = True
            await conn.send(Ready(migration_id=job.id, prefault_ms=int(job.stats.prefault_ms)))
            log.info("shell_ready", prefault_ms=round(job.stats.prefault_ms, 1), memory_bytes=p.memory_bytes)
            job.tracker.set_phase(expected=P.SETUP, new=P.PRECOPY)

            state = await self._receive_pages()
            job.tracker.set_phase(expected=P.PRECOPY, new=P.STOP_AND_COPY)
            conn.payload_sink = None
            self.vm.ctl.load_vcpu_state(state.vcpu_state)
            if FAULT_INJECT == "corrupt-page":       # test hook: a page that arrived wrong
                ram.ram[0] ^= 0xFF
                self.digests.mark(((0, 1),))
            # Digests of what we hold now, before the guest can change it: only
            # the chunks touched since the background worker last hashed them.
            t_v = time.monotonic()
            digests = await self.digests.finish()
            self.digests.close()
            job.stats.verify_ms = (time.monotonic() - t_v) * 1000.0
            await conn.expect(Resume, mcfg.io_timeout_s)
            job.tracker.set_phase(expected=P.STOP_AND_COPY, new=P.RESUME)

            # From here this host owns the VM, unless the source finds the digests
            # differ and says so (Abort VERIFY_FAILED).
            rec.state = "running"
            try:
                host.registry.save(self.vm)
            except OSError:
                rec.state = "incoming"          # not durable: not ours, discard as before Resume
                raise
            self.owned = True
            host.taken(job.id)
            self.vm.migrating = job.id          # not movable onward until this migration has ended
            try:
                await self.vm.resume(mcfg.guest_ack_timeout_s)
            except VmError as exc:
                # The standby guest died: the VM is ours, so start a new guest from
                # the state in its segment (as a restart would) rather than lose it.
                log.error("standby_guest_lost", error=str(exc))
                await self.vm.stop_guest(1.0)
                self.vm.ctl.command(Cmd.RUN)
                self.vm.start_guest(host.guest_log(p.vm))
                host.registry.save(self.vm)
                await self.vm.wait_running(mcfg.guest_ack_timeout_s)
            writes = int(self.vm.ctl.writes)
            job.stats.writes_after_resume = writes
            if FAULT_INJECT == "lose-resumed":      # test hook: the link dies right after the resume
                conn.fail(PeerLost("fault injection: connection lost after resume"))
                conn.transport.abort()
            await conn.send(Resumed(writes=writes))
            job.tracker.set_phase(expected=P.RESUME, new=P.VERIFY)
            await conn.send(Digests(chunk_pages=self.digests.chunk_pages, digests=digests))
            try:
                await conn.expect(Commit, mcfg.io_timeout_s)
                job.verified = True        # the source compared and committed
                await conn.send(Committed())
            except PeerError as exc:
                if exc.code == ErrorCode.VERIFY_FAILED:
                    raise VerifyFailed(str(exc)) from exc
                log.warning("commit_not_received", error=str(exc))
            except (AgentError, ProtocolError) as exc:
                log.warning("commit_not_received", error=str(exc))
            job.tracker.set_phase(expected=P.VERIFY, new=P.COMMIT)
            job.tracker.set_phase(expected=P.COMMIT, new=P.COMPLETED)
            job.finish()
            log.info("inbound_completed", writes=writes)

    def _sink(self, batch: PageBatch):
        npages = self.vm.ram.npages
        ram = self.vm.ram.ram
        for first, count in batch.runs:          # all checked before any view exists
            if first + count > npages:
                raise RemoteProtocolError(f"pages {first}+{count} beyond the VM's {npages} pages", ErrorCode.MALFORMED)
        return [ram[first * PAGE_SIZE:(first + count) * PAGE_SIZE] for first, count in batch.runs]

    async def _receive_pages(self) -> StateTransfer:
        conn, st = self.conn, self.job.stats
        timeout = self.host.cfg.migration.io_timeout_s
        ram = self.vm.ram
        while True:
            msg = await conn.recv(timeout)
            if isinstance(msg, PageBatch):
                if msg.flags & BatchFlags.ZERO:
                    self._zero(msg)
                else:
                    st.pages_sent += msg.pages
                    st.bytes_sent += msg.payload_len
                    self.digests.mark(msg.runs)
            elif isinstance(msg, RoundEnd):
                st.rounds = msg.round
                st.remaining_bytes = msg.dirty_pages * PAGE_SIZE
            elif isinstance(msg, StateTransfer):
                return msg
            else:  # the session allows nothing else here
                raise RemoteProtocolError(f"unexpected {type(msg).__name__}", ErrorCode.UNEXPECTED)

    def _zero(self, msg: PageBatch) -> None:
        ram = self.vm.ram
        st = self.job.stats
        for first, count in msg.runs:
            if first + count > ram.npages:
                raise RemoteProtocolError(f"zero pages {first}+{count} beyond the VM", ErrorCode.MALFORMED)
            st.zero_pages += count
            if msg.round == 1:
                continue            # a fresh shell is zero already; round 1 sends each page once
            for a in range(first, first + count, 64):
                n = min(64, first + count - a)
                ram.ram[a * PAGE_SIZE:(a + n) * PAGE_SIZE] = _ZERO[: n * PAGE_SIZE]
            self.digests.mark(((first, count),))      # after the bytes changed

    # ---- failure -----------------------------------------------------------
    async def _discard(self, reason: str, code: ErrorCode, reject: bool = False,
                       verify_failed: bool = False) -> None:
        job = self.job
        if self.digests is not None:
            self.digests.close()
        if self.owned and verify_failed and job is not None:
            self.host.untake(job.id)        # discarded on the source's word: no longer ours
        if self.owned and not verify_failed:
            # The guest already runs here; the source has committed or will learn it by query.
            log.warning("inbound_error_after_resume", error=reason)
            if job is not None and job.phase in (P.RESUME, P.VERIFY):
                job.tracker.set_phase(expected=job.phase, new=P.COMMIT)
            if job is not None and job.phase is P.COMMIT:
                job.tracker.set_phase(expected=P.COMMIT, new=P.COMPLETED)
            return
        if reject:
            try:
                await self.conn.send(Reject(code=code, reason=reason[:REASON_CHARS]))
            except (AgentError, ProtocolError):
                pass
        elif not isinstance(self.conn.failure, (PeerLost,)):
            await self.conn.abort(code, reason)
        vm = self.vm
        if vm is not None:
            self.conn.close()
            await self.conn.wait_closed()     # the transport may hold views of the shell
            await vm.stop_guest(self.host.cfg.migration.guest_ack_timeout_s)
            vm.release()
            self.host.registry.remove(vm)
            self.vm = None
        if job is not None and job.phase not in (P.COMPLETED, P.FAILED, P.CANCELLED):
            job.error = reason
            cancelled = code == ErrorCode.CANCELLED
            job.tracker.set_phase(expected=job.phase, new=P.CANCELLING if cancelled else P.ROLLING_BACK)
            job.tracker.set_phase(expected=job.phase, new=P.CANCELLED if cancelled else P.FAILED)
        log.info("shell_discarded", reason=reason)
