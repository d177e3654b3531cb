"""Data streams: a migration's pages on connections of their own, moved by threads.

The migration connection (``transport.FrameProtocol``, on the event loop)
carries the conversation: Prepare/Ready, RoundEnd/RoundAck, the switchover.
The pages travel on ``Ready.streams`` more TCP connections to the same
endpoint (QEMU's multifd channels, Hyper-V's SMB multichannel), each served
by one thread that does blocking ``sendmsg``/``sendall`` (source) or
``recv_into`` straight into guest memory (destination). The GIL is released
inside each syscall and inside OpenSSL, so the event loop only coordinates
and the copies (and TLS) of several streams run in parallel.

Wire, per data stream::

    DATA_STREAM_MAGIC (8 bytes, plaintext) | TLS handshake (security.mode = tls)
    Join(migration_id, stream, token)      | PageBatch+payload ... RoundEnd(n) ... | EOF

The endpoint reads the magic to tell a data stream from a control
connection before any TLS byte; the Join token is Ready's, a secret only
the authenticated control connection carried, and with TLS the data
stream's certificate must name the same agent as the control connection's.

**Ordering.** A page always travels on the stream of its 4 MiB chunk
(``stream_of``), so a page re-sent in round n+1 queues behind its own round-n
copy on one TCP connection and can never be overtaken by it, whatever the
other streams do. What spans streams is the round: every stream ends its
part of round n with its own RoundEnd(n), and the destination acts on the
control stream's RoundEnd(n) (RoundAck) and StateTransfer only once every
data stream has delivered its RoundEnd of that round. Zero batches travel
the same way and are applied by the receiving thread in stream order.

**Failure.** Any error on a stream (reset, EOF before the end, a protocol
error, a stalled peer past ``io_timeout_s``) fails the migration through the
control connection's sticky error, like a lost control connection: before
Resume the VM stays on the source. ``close()`` shuts every socket down and
joins every thread before the caller lets go of the memory the threads
read or write: no thread ever touches a released segment.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import socket
import ssl
import threading
import time
from typing import Callable, Sequence

from protocol import (
    CLOSED,
    DATA_STREAM_MAGIC,
    NEED_DATA,
    Abort,
    BatchFlags,
    ErrorCode,
    Join,
    MigrationSession,
    MsgType,
    PageBatch,
    ProtocolError,
    RemoteProtocolError,
    Role,
    RoundEnd,
    encode_frame,
)
from protocol.framing import PREFIX_SIZE, FrameDecoder, PayloadFollows, decode_body, parse_prefix

from agent.errors import PeerError, PeerLost
from agent.observe.logs import get_logger

log = get_logger("livemig.datastream")

PAGE = 4096
STREAM_CHUNK_PAGES = 1024          # 4 MiB: the unit pages are spread over the streams by
QUEUE_BYTES = 2 * 2**20            # per stream, queued in the sender before the loop waits
COALESCE_BYTES = 256 * 1024        # TLS: views smaller than this are gathered into one write
IOV_MAX = 512                      # iovecs per sendmsg (Linux allows 1024)
MAX_UNHANDLED = 8                  # batches a receiver may be ahead of the loop's bookkeeping
SCATTER_MIN_RUNS = 4               # as transport.py: many small runs go through a bounce buffer
SCATTER_AVG_BYTES = 64 * 1024
JOIN_MAX_BODY = 512                # a Join body is < 100 bytes
JOIN_TIMEOUT_S = 10.0


def stream_of(section: int, page: int, nstreams: int) -> int:
    """The data stream of ``page`` of ``section``: the same one in every round."""
    return (page // STREAM_CHUNK_PAGES + section) % nstreams


def split_runs(section: int, runs: Sequence[tuple[int, int]], nstreams: int) -> list[list[tuple[int, int]]]:
    """``runs`` cut at chunk boundaries and sorted onto their streams (run
    order kept within each stream, touching runs merged)."""
    out: list[list[tuple[int, int]]] = [[] for _ in range(nstreams)]
    if nstreams == 1:
        out[0] = [(f, c) for f, c in runs]
        return out
    for first, count in runs:
        while count:
            n = min(count, STREAM_CHUNK_PAGES - first % STREAM_CHUNK_PAGES)
            dst = out[(first // STREAM_CHUNK_PAGES + section) % nstreams]
            if dst and dst[-1][0] + dst[-1][1] == first:
                dst[-1] = (dst[-1][0], dst[-1][1] + n)
            else:
                dst.append((first, n))
            first += n
            count -= n
    return out


def _recv_exact(sock, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise PeerLost("data stream closed mid-frame")
        got += k


class _StreamThread(threading.Thread):
    """What both ends' stream threads share: a socket, a condition the loop
    notifies, and a stop that wakes the thread wherever it blocks (on the
    condition or in a syscall on the socket)."""

    def __init__(self, index: int, sock, name: str) -> None:
        super().__init__(name=f"{name}-{index}", daemon=True)
        self.index, self.sock = index, sock
        self.cv = threading.Condition()
        self.stopping = False

    def stop(self) -> None:
        """Stop now (failure, cancel, close)."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# ============================================================================ source
class _Sender(_StreamThread):
    """One data stream's sending thread: takes (frame, views) items in order."""

    def __init__(self, index: int, sock, loop: asyncio.AbstractEventLoop, owner: "OutboundStreams") -> None:
        super().__init__(index, sock, "stream-tx")
        self.loop, self.owner = loop, owner
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.items: collections.deque = collections.deque()
        self.queued = 0                    # payload bytes queued, not yet sent
        self.busy = False                  # an item taken and not yet sent
        self.failure: BaseException | None = None
        self.bytes_sent = 0
        self._gather = bytearray(COALESCE_BYTES * 2)

    def put(self, frame: bytes, views: list, nbytes: int) -> None:
        with self.cv:
            self.items.append((frame, views, nbytes))
            self.queued += nbytes
            self.cv.notify()

    def finish(self) -> None:
        """No more items: send what is queued, then end the stream (EOF)."""
        with self.cv:
            self.items.append(None)
            self.cv.notify()

    def run(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.items and not self.stopping:
                        self.cv.wait()
                    if self.stopping:
                        return
                    item = self.items.popleft()
                    self.busy = item is not None
                if item is None:
                    try:
                        self.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                frame, views, nbytes = item
                try:
                    self._send(frame, views)
                finally:
                    views.clear()          # the views of guest memory go at once
                with self.cv:
                    self.queued -= nbytes
                    self.busy = False
                self.bytes_sent += nbytes
                self.loop.call_soon_threadsafe(self.owner._progress)
        except BaseException as exc:        # noqa: BLE001 - reported to the loop, never lost
            # Without its traceback: its frames hold views of guest memory.
            exc = exc.with_traceback(None)
            if not self.stopping:
                self.failure = exc
                try:
                    self.loop.call_soon_threadsafe(self.owner._failed, self.index, exc)
                except RuntimeError:       # the loop is closing
                    pass
        finally:
            self.drop_items()

    def drop_items(self) -> None:
        """Every queued view of guest memory goes (the lists too: a caller's
        frame kept by a traceback may still hold one)."""
        with self.cv:
            for it in self.items:
                if it is not None:
                    it[1].clear()
            self.items.clear()
            self.busy = False

    def _send(self, frame: bytes, views: list) -> None:
        sock = self.sock
        if not self.tls:
            bufs = [frame, *views]
            while bufs:
                part = bufs[:IOV_MAX]
                sent = sock.sendmsg(part)
                total = sum(len(b) for b in part)
                if sent == total:
                    del bufs[:IOV_MAX]
                    continue
                # partial: drop what went, keep the rest of the first unsent buffer
                i = 0
                while sent >= len(bufs[i]):
                    sent -= len(bufs[i])
                    i += 1
                bufs = [memoryview(bufs[i])[sent:], *bufs[i + 1:]]
            return
        # TLS: one record per write call at most 16 KiB anyway; gather small
        # pieces (the frame, scattered 4 KiB pages) so a write carries full records.
        g, glen = self._gather, 0
        for b in (frame, *views):
            n = len(b)
            if n >= COALESCE_BYTES:
                if glen:
                    sock.sendall(memoryview(g)[:glen])
                    glen = 0
                sock.sendall(b)
                continue
            if glen + n > len(g):
                sock.sendall(memoryview(g)[:glen])
                glen = 0
            g[glen:glen + n] = b
            glen += n
        if glen:
            sock.sendall(memoryview(g)[:glen])



def _connect_one(host: str, port: int, index: int, migration_id: str, token: bytes, ctx: ssl.SSLContext | None,
                 expect_peer: str | None, timeout_s: float, io_timeout_s: float):
    """In a thread: connect, the magic, TLS (its certificate must name the
    agent of the migration connection), the Join. Returns (sock, session)."""
    from agent.net.tls import PeerIdentityError, peer_identity

    where = f"data stream {index} to {host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise PeerLost(f"{where}: cannot connect: {exc}") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(DATA_STREAM_MAGIC)
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(sock, server_hostname=None)
            except ssl.SSLError as exc:
                raise PeerError(f"{where}: TLS handshake failed: {exc.reason or exc}",
                                int(ErrorCode.AUTH_FAILED)) from exc
            try:
                name = peer_identity(sock)
            except PeerIdentityError as exc:
                raise PeerError(f"{where}: {exc}", int(ErrorCode.AUTH_FAILED)) from exc
            if expect_peer is not None and name != expect_peer:
                raise PeerError(f"{where}: its certificate names {name!r}, the migration connection's "
                                f"{expect_peer!r}", int(ErrorCode.AUTH_FAILED))
        session = MigrationSession(Role.SOURCE)
        sock.sendall(session.send(Join(migration_id=migration_id, stream=index, token=token)))
        sock.settimeout(io_timeout_s)      # a peer that stops reading this long: failed
        return sock, session
    except OSError as exc:
        sock.close()
        raise PeerLost(f"{where}: {exc}") from exc
    except BaseException:
        sock.close()
        raise


class OutboundStreams:
    """The source's data streams of one migration (loop-thread API)."""

    def __init__(self, n: int, on_failure: Callable[[BaseException], None]) -> None:
        self.n = n
        self._on_failure = on_failure
        self.senders: list[_Sender] = []
        self.sessions: list[MigrationSession] = []
        self.failure: BaseException | None = None
        self._space = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.bytes_queued = 0

    async def open(self, host: str, port: int, migration_id: str, token: bytes, ctx, expect_peer: str | None,
                   timeout_s: float, io_timeout_s: float) -> None:
        """Connect every stream (in parallel threads) and start its sender."""
        tasks = [asyncio.ensure_future(asyncio.to_thread(_connect_one, host, port, i, migration_id, token, ctx,
                                                         expect_peer, timeout_s, io_timeout_s))
                 for i in range(self.n)]
        try:
            results = await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
        except asyncio.CancelledError:
            # Cancelled (the job): the connects finish in their threads; close what they made.
            for r in await asyncio.gather(*tasks, return_exceptions=True):
                if not isinstance(r, BaseException):
                    r[0].close()
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        for r in results:
            if not isinstance(r, BaseException):
                sock, session = r
                if errors:
                    sock.close()
                    continue
                s = _Sender(len(self.senders), sock, self._loop, self)
                self.senders.append(s)
                self.sessions.append(session)
        if errors:
            raise errors[0]
        for s in self.senders:
            s.start()

    # ---- called by the threads (through the loop) ----------------------------
    def _progress(self) -> None:
        self._space.set()

    def _failed(self, index: int, exc: BaseException) -> None:
        if self.failure is None:
            err = exc if isinstance(exc, (PeerLost, PeerError)) else PeerLost(
                f"data stream {index} failed: {exc or type(exc).__name__}")
            self.failure = err
            log.warning("data_stream_failed", stream=index, error=str(err))
            self._on_failure(err)
        self._space.set()

    def interrupt(self, exc: BaseException) -> None:
        """The migration failed elsewhere (control connection, guest): a send
        waiting for room stops waiting."""
        if self.failure is None:
            self.failure = exc
        self._space.set()

    # ---- sending -----------------------------------------------------------------
    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def send(self, section: int, round_no: int, runs: Sequence[tuple[int, int]], mem, zero: bool = False) -> None:
        """Queue the pages of ``runs`` (views of ``mem``, never copied here) on their streams."""
        self.check()
        parts = split_runs(section, runs, self.n)
        for i, sruns in enumerate(parts):
            if not sruns:
                continue
            pages = sum(c for _, c in sruns)
            nbytes = 0 if zero else pages * PAGE
            msg = PageBatch(section=section, round=round_no, runs=tuple(sruns),
                            flags=BatchFlags.ZERO if zero else BatchFlags.NONE, payload_len=nbytes)
            frame = self.sessions[i].send(msg)
            sender = self.senders[i]
            while sender.queued >= QUEUE_BYTES:
                self._space.clear()
                if sender.queued < QUEUE_BYTES:
                    break
                await self._space.wait()
                self.check()
            views = [] if zero else [mem[f * PAGE:(f + c) * PAGE] for f, c in sruns]
            sender.put(frame, views, nbytes)
            self.bytes_queued += nbytes

    def end_round(self, round_no: int, pages: int, dirty: int) -> None:
        """Every stream's own RoundEnd(round_no), behind its pages of the round."""
        self.check()
        for s, sess in zip(self.senders, self.sessions):
            s.put(sess.send(RoundEnd(round=round_no, pages_sent=pages, dirty_pages=dirty)), [], 0)

    def finish(self) -> None:
        """No more pages: each stream sends what it has queued, then ends
        (EOF). Not waited for: the destination's answer (its digests) says
        everything arrived; ``close()`` joins the threads afterwards."""
        self.check()
        for s in self.senders:
            s.finish()

    async def finish_and_join(self, timeout_s: float) -> None:
        """finish(), then wait until every stream has sent everything and
        ended; a stream that cannot within ``timeout_s`` is a failure."""
        self.finish()
        await self._join(timeout_s)
        self.check()

    async def close(self) -> None:
        """Stop what still runs (failure, cancel, rollback; after a finish the
        threads have ended or are ending) and join the threads."""
        for s in self.senders:
            if s.is_alive():
                s.stop()
        await self._join(5.0)
        for s in self.senders:
            s.drop_items()                 # also what was queued after a thread had ended
            try:
                s.sock.close()
            except OSError:
                pass

    async def _join(self, timeout_s: float) -> None:
        t_end = time.monotonic() + timeout_s
        for s in self.senders:
            if s.ident is None:
                continue
            await asyncio.to_thread(s.join, max(0.0, t_end - time.monotonic()))
            if s.is_alive():                 # a send stuck past the deadline: wake it
                if self.failure is None and not s.stopping:
                    self.failure = PeerLost(f"data stream {s.index} could not send what it had queued "
                                            f"within {timeout_s:g} s")
                s.stop()
                await asyncio.to_thread(s.join)

    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.senders)


# ============================================================================ destination
class _Receiver(_StreamThread):
    """One data stream's receiving thread: payloads straight into guest memory."""

    def __init__(self, index: int, sock, session: MigrationSession, owner: "InboundStreams") -> None:
        super().__init__(index, sock, "stream-rx")
        self.session, self.owner = session, owner
        self.ended = False               # EOF at a frame boundary
        self.bytes_received = 0
        self._bounce = bytearray(0)
        # Batches posted to the loop and not yet handled there: bounded, so a
        # section that buffers payloads (disk) cannot pile up memory when the
        # loop is slower than the link.
        self.posted = 0
        self.handled = 0

    def posted_batch(self) -> None:
        """After posting a batch: wait while too many are unhandled."""
        with self.cv:
            self.posted += 1
            while self.posted - self.handled > MAX_UNHANDLED and not self.stopping:
                self.cv.wait(0.5)

    def batch_handled(self) -> None:     # loop thread
        with self.cv:
            self.handled += 1
            self.cv.notify()

    def run(self) -> None:
        owner = self.owner
        try:
            owner.hold(self.index)
            self._loop_frames()
        except BaseException as exc:  # noqa: BLE001 - reported to the loop, never lost
            if not self.stopping:
                if isinstance(exc, ProtocolError):
                    try:                    # tell the source why, on this stream (best effort)
                        self.sock.sendall(encode_frame(Abort(code=exc.code, reason=str(exc)[:1000])))
                    except (OSError, ValueError):
                        pass
                owner.post(owner._failed, self.index, exc.with_traceback(None))
        finally:
            self._bounce = bytearray(0)

    def _loop_frames(self) -> None:
        sock, dec, owner, session = self.sock, FrameDecoder(payload_passthrough=True), self.owner, self.session
        batch: PageBatch | None = None
        while True:
            ev = dec.next_event()
            if ev is NEED_DATA:
                buf = dec.get_buffer()
                n = sock.recv_into(buf)
                buf.release()
                if n == 0:
                    dec.receive_data(b"")
                    if dec.next_event() is CLOSED:     # else TRUNCATED raised
                        self.ended = True
                        owner.post(owner._ended, self.index)
                    return
                dec.buffer_updated(n)
                self.bytes_received += n
                continue
            if ev is CLOSED:
                return
            if type(ev) is PayloadFollows:
                if batch is None or ev.nbytes != batch.payload_len:
                    raise RemoteProtocolError(f"payload of {ev.nbytes} bytes without its batch", ErrorCode.MALFORMED)
                self._payload(dec, batch)
                owner.apply(batch)                       # in-thread effects (digests), in stream order
                owner.post(owner._batch, batch, self)
                self.posted_batch()
                batch = None
                continue
            msg = session.receive(ev)
            if type(msg) is PageBatch:
                owner.check_batch(msg)
                owner.note_round(self.index, msg.round)
                if msg.payload_len:
                    batch = msg
                else:
                    owner.apply(msg)                     # in stream order, here
                    owner.post(owner._batch, msg, self)
                    self.posted_batch()
            elif type(msg) is RoundEnd:
                owner.post(owner._synced, self.index, msg.round)
            elif type(msg) is Abort:
                raise PeerError(f"source aborted data stream {self.index}: {msg.reason}", int(msg.code))
            else:
                raise RemoteProtocolError(f"{type(msg).__name__} on a data stream", ErrorCode.UNEXPECTED)

    def _payload(self, dec: FrameDecoder, batch: PageBatch) -> None:
        targets = self.owner.sink(batch)
        try:
            nbytes = batch.payload_len
            if sum(len(t) for t in targets) != nbytes:
                raise RemoteProtocolError("payload does not match its runs", ErrorCode.MALFORMED)
            if len(targets) > SCATTER_MIN_RUNS and nbytes <= SCATTER_AVG_BYTES * len(targets):
                if len(self._bounce) < nbytes:
                    self._bounce = bytearray(nbytes)
                bounce = memoryview(self._bounce)[:nbytes]
                _recv_exact(self.sock, bounce)
                off = 0
                for t in targets:
                    n = len(t)
                    t[:] = bounce[off:off + n]
                    off += n
                bounce.release()
            else:
                for t in targets:
                    _recv_exact(self.sock, t)
            dec.payload_received(nbytes)
            self.bytes_received += nbytes
        finally:
            for t in targets:
                t.release()



class InboundStreams:
    """The destination's data streams of one migration.

    ``sink(batch)`` (thread): views where a batch's payload lands;
    ``apply(batch)`` (thread): once a batch's bytes are in place (or, for a
    zero batch, to put them there), in stream order;
    ``on_batch(batch)`` (loop): bookkeeping once a batch's bytes are in place;
    ``on_failure(exc)`` (loop): a stream failed.
    """

    def __init__(self, migration_id: str, n: int, peer_name: str | None, *, sink, apply, check_batch,
                 on_batch, on_failure, hold: tuple[int, int] | None = None) -> None:
        import secrets

        self.migration_id = migration_id
        self.n = n
        self.token = secrets.token_bytes(16)
        self.peer_name = peer_name
        self.sink, self.apply, self.check_batch = sink, apply, check_batch
        self._on_batch, self._on_failure = on_batch, on_failure
        # Test hook (LIVEMIG_TEST_STREAM_HOLD=stream:round): that stream reads
        # nothing until another stream received a page of round `round`, so
        # its older copies are still in flight while newer rounds land elsewhere.
        self._hold = hold
        self._released = threading.Event()
        self.hold_released_at: list[int] | None = None
        self.loop = asyncio.get_running_loop()
        self.receivers: list[_Receiver | None] = [None] * n
        self.synced = [0] * n
        self.seen = [0] * n                  # the latest round each stream's thread has seen a batch of
        self._ended_streams: set[int] = set()
        self.failure: BaseException | None = None
        self._changed = asyncio.Event()
        self.closed = False

    # ---- joining -------------------------------------------------------------
    def admit(self, join: Join, sock, session: MigrationSession, peer_name: str | None) -> str | None:
        """A data stream's Join (loop thread). None = taken; else why it is refused."""
        if self.closed:
            return "the migration is over"
        if not hmac.compare_digest(join.token, self.token):
            return "wrong token"
        if self.peer_name is not None and peer_name != self.peer_name:
            return f"certificate names {peer_name!r}, the migration connection {self.peer_name!r}"
        if join.stream >= self.n or self.receivers[join.stream] is not None:
            return f"stream {join.stream} is not expected (or joined already)"
        r = _Receiver(join.stream, sock, session, self)
        self.receivers[join.stream] = r
        r.start()
        self._changed.set()
        return None

    def joined(self) -> int:
        return sum(r is not None for r in self.receivers)

    # ---- from the threads ----------------------------------------------------
    def post(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:       # the loop is closing: nothing waits any more
            pass

    def hold(self, index: int) -> None:
        if self._hold is not None and index == self._hold[0]:
            log.info("data_stream_held", stream=index, until_round=self._hold[1])
            self._released.wait(60.0)

    def note_round(self, index: int, round_no: int) -> None:
        """A stream's thread saw a batch of ``round_no`` (for the test hold)."""
        if round_no > self.seen[index]:
            self.seen[index] = round_no
            if self._hold is not None and index != self._hold[0] and round_no >= self._hold[1] \
                    and not self._released.is_set():
                held = self._hold[0]
                self.hold_released_at = list(self.seen)
                log.info("data_stream_hold_released", stream=held, seen=list(self.seen), synced=list(self.synced))
                self._released.set()

    def _batch(self, batch: PageBatch, receiver: "_Receiver | None" = None) -> None:
        try:
            if self.failure is None and not self.closed:
                self._on_batch(batch)
        except Exception as exc:  # noqa: BLE001 - bookkeeping errors fail the migration
            self._failed(-1, exc)
        finally:
            if receiver is not None:
                receiver.batch_handled()

    def _synced(self, index: int, round_no: int) -> None:
        if round_no > self.synced[index]:
            self.synced[index] = round_no
        self._changed.set()

    def _ended(self, index: int) -> None:
        self._ended_streams.add(index)
        self._changed.set()

    def _failed(self, index: int, exc: BaseException) -> None:
        if self.failure is None and not self.closed:
            if isinstance(exc, OSError) or not isinstance(exc, Exception):
                self.failure = PeerLost(f"data stream {index}: {exc or type(exc).__name__}")
            else:                  # a protocol error, a full /dev/shm (SegmentError), ...: as it is
                self.failure = exc
            log.warning("data_stream_failed", stream=index, error=str(self.failure))
            self._on_failure(self.failure)
        self._changed.set()

    # ---- waiting -------------------------------------------------------------
    def reached_now(self, round_no: int) -> bool:
        return all(r is not None for r in self.receivers) and min(self.synced) >= round_no

    async def reached(self, round_no: int, timeout_s: float) -> None:
        """Until every stream delivered its RoundEnd(round_no): all of the
        round's pages are in memory and their bookkeeping ran."""
        deadline = time.monotonic() + timeout_s
        while not self.reached_now(round_no):
            if self.failure is not None:
                raise self.failure
            for i in self._ended_streams:     # loop-side: after that stream's last RoundEnd was seen
                if self.synced[i] < round_no:
                    raise PeerLost(f"data stream {i} ended before round {round_no}")
            left = deadline - time.monotonic()
            if left <= 0:
                missing = self.n - self.joined()
                raise PeerLost(f"data streams did not deliver round {round_no} within {timeout_s:.0f} s"
                               + (f" ({missing} of {self.n} never joined)" if missing else ""))
            self._changed.clear()
            try:
                async with asyncio.timeout(left):
                    await self._changed.wait()
            except TimeoutError:
                pass
        if self.failure is not None:
            raise self.failure

    async def close(self) -> None:
        """Stop every stream and join its thread (before the memory goes)."""
        self.closed = True
        self._released.set()
        for r in self.receivers:
            if r is not None and r.is_alive():
                r.stop()
        for r in self.receivers:
            if r is not None and r.ident is not None:
                await asyncio.to_thread(r.join)
        for r in self.receivers:
            if r is not None:
                try:
                    r.sock.close()
                except OSError:
                    pass

    def bytes_received(self) -> int:
        return sum(r.bytes_received for r in self.receivers if r is not None)


# ============================================================================ endpoint side
def accept_data_stream(sock: socket.socket, ctx: ssl.SSLContext | None, timeout_s: float,
                       on_tls: Callable[[], None] | None = None):
    """In a thread: the magic, TLS, the Join, within ``timeout_s`` each.
    Returns (sock, join, session, peer_name); on any failure the socket is closed."""
    from agent.net.tls import peer_identity

    try:
        sock.setblocking(True)
        sock.settimeout(timeout_s)
        magic = bytearray(len(DATA_STREAM_MAGIC))
        _recv_exact(sock, memoryview(magic))
        if bytes(magic) != DATA_STREAM_MAGIC:
            raise RemoteProtocolError("not a data stream", ErrorCode.BAD_MAGIC)
        peer_name = None
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_side=True)
            peer_name = peer_identity(sock)
            if on_tls is not None:
                on_tls()
        # The Join, read by hand: its prefix is checked before a body buffer
        # exists, so an unauthenticated peer cannot make us allocate 4 MiB.
        head = bytearray(PREFIX_SIZE)
        _recv_exact(sock, memoryview(head))
        prefix = parse_prefix(head)
        if prefix.type is not MsgType.JOIN:
            raise RemoteProtocolError(f"{prefix.type.name} on a data stream, expected Join", ErrorCode.UNEXPECTED)
        if prefix.body_len > JOIN_MAX_BODY or prefix.payload_len:
            raise RemoteProtocolError(f"a {prefix.type.name} of {prefix.body_len}+{prefix.payload_len} bytes "
                                      f"where a Join belongs", ErrorCode.TOO_LARGE)
        body = bytearray(prefix.body_len)
        _recv_exact(sock, memoryview(body))
        session = MigrationSession(Role.DESTINATION)
        join = session.receive(decode_body(prefix, body))
        if type(join) is not Join:          # the session also allows a control connection's Hello here
            raise RemoteProtocolError(f"{type(join).__name__} on a data stream, expected Join",
                                      ErrorCode.UNEXPECTED)
        sock.settimeout(None)               # from here the migration's own deadlines apply
        return sock, join, session, peer_name
    except BaseException:
        sock.close()
        raise
