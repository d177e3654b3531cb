"""The IO adapter between asyncio and the sans-IO protocol.

``FrameProtocol`` is an ``asyncio.BufferedProtocol`` driving the one frame
parser, ``protocol.framing.FrameDecoder``, with exact reads: ``get_buffer``
returns the decoder's view of exactly the bytes still missing from the
current prefix or body, and, after the decoder's ``PayloadFollows``, the
payload sink's views of guest memory, one run at a time. The kernel copies
each page once, into its final place in the destination segment, and never
reads past a frame boundary::

    prefix(16) | body(body_len) | payload(payload_len) -> run0 slice, run1 slice, ...
    get_buffer: [prefix 16] [body n] [ram[run0]] [ram[run1]] ... [prefix 16] ...
                 decoder.get_buffer()  sink views (decoder.payload_received)

A batch of many small runs is read into one bounce buffer instead (one recv
instead of one per 4 KiB run) and scattered with memcpy.

Messages (never payloads) go to a bounded inbox; reading pauses while the
inbox is full. Writes are ``transport.write`` of the encoded frame and of
memoryviews of the source segment, followed by ``drain()``.

With TLS (``agent.net.tls``) the same protocol sits on asyncio's SSL
transport, which drives a BufferedProtocol the same way: it decrypts
straight into the views ``get_buffer`` returns (one copy, the decryption
itself), so payloads still land in guest memory without a bounce.

Until the peer is authenticated (``max_body_bytes``, raised by the
endpoint's handshake gate) a frame body may not exceed PRE_AUTH_MAX_BODY:
an unauthenticated peer cannot make the agent hold megabytes per connection.

Errors follow QEMU's sticky-error rule: the first failure (protocol error,
Abort from the peer, connection lost, IO timeout) is recorded, every later
``send``/``recv`` raises it, and it is recorded *before* the transport is
closed.
"""
from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Any, Callable, Sequence

from protocol import (
    CLOSED,
    NEED_DATA,
    Abort,
    ErrorCode,
    LocalProtocolError,
    Message,
    MigrationSession,
    PageBatch,
    ProtocolError,
    Reject,
    RemoteProtocolError,
    encode_frame,
)
from protocol.framing import MAX_FRAME_BYTES, FrameDecoder, PayloadFollows

from agent.errors import PeerError, PeerLost

INBOX_LIMIT = 256               # messages queued before reading pauses
LINGER_S = 1.0                  # after answering a bad peer, drain its input this long before closing
WRITE_HIGH_WATER = 8 * 1024 * 1024
SCATTER_MIN_RUNS = 4            # batches of more runs than this, averaging at most
SCATTER_AVG_BYTES = 64 * 1024   # ... this per run, are received through a bounce buffer
DISCARD_BYTES = 65536           # read size while lingering after a protocol error
PRE_AUTH_MAX_BODY = 64 * 1024   # largest frame body before authentication (a Hello is < 4 KiB)

PayloadSink = Callable[[PageBatch], Sequence[memoryview]]


class FrameProtocol(asyncio.BufferedProtocol):
    def __init__(self, session: MigrationSession, on_connect: Callable[["FrameProtocol"], None] | None = None) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.payload_sink: PayloadSink | None = None
        self.failure: BaseException | None = None
        self.peer: str = "?"
        self.bytes_received = 0
        self.last_rx = time.monotonic()
        self._on_connect = on_connect
        self._inbox: collections.deque[Message] = collections.deque()
        self._inbox_waiter: asyncio.Future | None = None
        self._reading_paused = False
        self._write_ok = asyncio.Event()
        self._write_ok.set()
        self._closed = asyncio.Event()
        # read side: the decoder owns prefix and body; a payload goes to _targets
        self._decoder = FrameDecoder(payload_passthrough=True)
        self._batch: PageBatch | None = None       # parsed, its payload not yet in
        self._targets: Sequence[memoryview] = ()   # where the payload goes, in stream order
        self._ti = 0                               # current target
        self._got = 0                              # bytes of it filled
        self._scatter: Sequence[memoryview] | None = None   # sink views behind the bounce buffer
        self._bounce = bytearray(0)
        self._discard: memoryview | None = None    # set once a protocol error was answered
        #: largest frame body accepted now; the handshake gate raises it once the peer is authenticated
        self.max_body_bytes = MAX_FRAME_BYTES
        #: the agent name in the peer's verified TLS certificate (None: no TLS)
        self.peer_name: str | None = None
        #: the endpoint's handshake bookkeeping for this connection (None on the connecting side)
        self.gate: Any = None
        #: a protocol error closes at once, unanswered (a TLS peer not yet authenticated)
        self.refuse_silently = False

    # ---- asyncio callbacks -------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self._on_connect is not None:
            self._on_connect(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._targets:
            return self._targets[self._ti][self._got:]
        if self._discard is not None:
            return self._discard
        view = self._decoder.get_buffer()
        n = len(view)
        if n > self.max_body_bytes:              # only a body view can be longer than 16 bytes
            view.release()
            self._decoder = FrameDecoder(payload_passthrough=True)   # drops the body buffer at once
            self._protocol_error(RemoteProtocolError(
                f"frame body of {n} bytes before authentication (limit {self.max_body_bytes})",
                ErrorCode.TOO_LARGE))
            return self._discard
        return view

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        self.last_rx = time.monotonic()
        try:
            if self._targets:
                self._decoder.payload_received(nbytes)
                got = self._got = self._got + nbytes
                if got < len(self._targets[self._ti]):
                    return
                self._ti += 1
                self._got = 0
                if self._ti == len(self._targets):
                    self._payload_done()   # the decoder now waits for the next prefix
                return
            elif self._discard is not None:
                return
            else:
                self._decoder.buffer_updated(nbytes)
            self._pump()
        except ProtocolError as exc:
            self._protocol_error(exc)
        except Exception as exc:  # a payload sink bug must not kill the loop
            self._protocol_error(RemoteProtocolError(f"internal error: {exc!r}", ErrorCode.INTERNAL))

    def _pump(self) -> None:
        """Take every event the decoder has, up to a payload or more needed bytes."""
        decoder = self._decoder
        while True:
            event = decoder.next_event()
            if event is NEED_DATA or event is CLOSED:
                return
            if type(event) is PayloadFollows:
                self._start_payload(event.nbytes)
                return
            msg = self.session.receive(event)
            if type(msg) is PageBatch and msg.payload_len:
                self._batch = msg              # delivered once its payload is in memory
            else:
                self._deliver(msg)

    def _start_payload(self, nbytes: int) -> None:
        msg = self._batch
        if msg is None or nbytes != msg.payload_len:   # the decoder announces right after the batch
            raise LocalProtocolError(f"payload of {nbytes} bytes without its batch")
        if self.payload_sink is None:
            raise RemoteProtocolError("page batch outside a transfer", ErrorCode.UNEXPECTED)
        targets = self.payload_sink(msg)
        if sum(len(t) for t in targets) != nbytes:
            for t in targets:
                t.release()
            raise RemoteProtocolError("payload does not match its runs", ErrorCode.MALFORMED)
        if len(targets) > SCATTER_MIN_RUNS and nbytes <= SCATTER_AVG_BYTES * len(targets):
            # Many small runs: one recv into a bounce buffer, then scatter with
            # memcpy, instead of one recv_into syscall per 4 KiB run.
            if len(self._bounce) < nbytes:
                self._bounce = bytearray(nbytes)
            self._scatter = targets
            targets = [memoryview(self._bounce)[:nbytes]]
        self._targets, self._ti, self._got = targets, 0, 0

    def _payload_done(self) -> None:
        if self._scatter is not None:
            src, off = self._targets[0], 0
            for t in self._scatter:
                n = len(t)
                t[:] = src[off:off + n]
                off += n
        self._release_targets()
        batch, self._batch = self._batch, None
        self._deliver(batch)

    def _release_targets(self) -> None:
        for t in self._targets:
            t.release()
        self._targets = ()
        if self._scatter is not None:
            for t in self._scatter:
                t.release()
            self._scatter = None

    def _deliver(self, msg: Message) -> None:
        if isinstance(msg, Abort) and self.failure is None:
            self.failure = PeerError(f"peer aborted: {msg.reason}", int(msg.code))
        self._inbox.append(msg)
        if len(self._inbox) >= INBOX_LIMIT and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        w = self._inbox_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _protocol_error(self, exc: ProtocolError) -> None:
        if self.failure is None:
            # Without its traceback: the frames would keep views of guest memory alive.
            self.failure = exc.with_traceback(None)
        self._release_targets()
        self._batch = None
        if self._discard is None:   # nothing more is parsed: the decoder is in its error state
            self._discard = memoryview(bytearray(DISCARD_BYTES))
        tr = self.transport
        if tr is not None and not tr.is_closing():
            if self.refuse_silently:
                # An unauthenticated TLS peer gets no answer and no lingering: a
                # graceful TLS close would keep buffering what it still sends.
                tr.abort()
            else:
                # Lingering close: answer, half-close, and swallow what the peer still
                # sends, so our Abort is not lost to a reset caused by unread input.
                tr.write(encode_frame(Abort(code=exc.code, reason=str(exc)[:1000])))
                if tr.can_write_eof():
                    tr.write_eof()
                # TLS: no close_notify exchange after the linger (the peer may never answer it).
                end = tr.abort if tr.get_extra_info("ssl_object") is not None else tr.close
                asyncio.get_running_loop().call_later(LINGER_S, end)
        self._wake()

    def eof_received(self) -> bool:
        if self._discard is None:
            try:
                self._decoder.receive_data(b"")
                self._decoder.next_event()     # CLOSED at a frame boundary, else TRUNCATED
            except ProtocolError as exc:
                if self.failure is None:
                    self.failure = exc.with_traceback(None)
                self._release_targets()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.failure is None:
            self.failure = PeerLost(f"connection to {self.peer} lost" + (f": {exc}" if exc else " (EOF)"))
        self._release_targets()
        # Nothing more is parsed: free a partly received body (up to 4 MiB) and the
        # bounce buffer now, not when the cyclic GC gets to this protocol.
        self._decoder = FrameDecoder(payload_passthrough=True)
        self._bounce = bytearray(0)
        self._write_ok.set()
        self._closed.set()
        self._wake()
        # ... and the transport (TLS: its buffers) once the loop is done with it.
        self.transport = None

    def pause_writing(self) -> None:
        # A peer that does not read what we must answer (RoundAcks, an Abort)
        # gets nothing more read from it either: our write buffer stays bounded.
        self._write_ok.clear()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_ok.set()
        if self.transport is not None and not self._reading_paused:
            self.transport.resume_reading()

    # ---- coroutine API -----------------------------------------------------
    def check(self) -> None:
        """Raise the sticky failure, if any (cheap; call once per batch)."""
        if self.failure is not None:
            raise self.failure

    async def send(self, msg: Message, payload: Sequence[memoryview] = (), *, timeout_s: float = 30.0) -> None:
        self.check()
        data = self.session.send(msg)
        if payload:
            self.transport.writelines([data, *payload])     # one writev, pages not copied
        else:
            self.transport.write(data)
        if not self._write_ok.is_set():
            await self.drain(timeout_s)

    async def drain(self, timeout_s: float = 30.0) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await self._write_ok.wait()
        except TimeoutError:
            self.fail(PeerLost(f"peer {self.peer} stopped reading for {timeout_s:.0f} s"))
        self.check()

    async def recv(self, timeout_s: float = 30.0) -> Message:
        """Next message from the peer; raises the sticky failure or PeerLost on timeout."""
        while not self._inbox:
            self.check()
            loop = asyncio.get_running_loop()
            self._inbox_waiter = loop.create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._inbox_waiter
            except TimeoutError:
                self.fail(PeerLost(f"no message from {self.peer} for {timeout_s:.0f} s"))
            finally:
                self._inbox_waiter = None
        msg = self._inbox.popleft()
        if self._reading_paused and len(self._inbox) < INBOX_LIMIT // 2 and self.transport is not None:
            self._reading_paused = False
            if self._write_ok.is_set():
                self.transport.resume_reading()
        if isinstance(msg, Abort):
            raise self.failure or PeerError(msg.reason, int(msg.code))
        return msg

    async def expect(self, cls: type | tuple[type, ...], timeout_s: float = 30.0):
        """The next message, which must be a ``cls`` (a class or a tuple of
        them); a Reject in its place raises PeerError with the peer's reason."""
        msg = await self.recv(timeout_s)
        if isinstance(msg, Reject) and not (isinstance(cls, type) and cls is Reject):
            raise PeerError(f"{self.peer} refused: {msg.reason}", int(msg.code))
        if not isinstance(msg, cls):  # the session already checked the order; this is a driver bug guard
            names = "|".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
            raise RemoteProtocolError(f"expected {names}, got {type(msg).__name__}", ErrorCode.UNEXPECTED)
        return msg

    def fail(self, exc: BaseException) -> None:
        """Record a failure first, then close (sticky error before teardown)."""
        if self.failure is None:
            self.failure = exc
        self.close()
        self._wake()

    async def abort(self, code: ErrorCode, reason: str) -> None:
        """Tell the peer why we stop (best effort), then close."""
        tr = self.transport
        if tr is not None and not tr.is_closing():
            try:
                tr.write(self.session.send(Abort(code=code, reason=reason[:1000])))
            except (ProtocolError, LocalProtocolError, RuntimeError):
                pass
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def wait_closed(self, timeout_s: float = 5.0) -> None:
        self.close()
        try:
            async with asyncio.timeout(timeout_s):
                await self._closed.wait()
        except TimeoutError:
            if self.transport is not None:
                self.transport.abort()


async def connect(host: str, port: int, session: MigrationSession, timeout_s: float,
                  ssl_context: ssl.SSLContext | None = None) -> FrameProtocol:
    """Connect (and, with ``ssl_context``, complete mutual TLS). With TLS the
    returned protocol's ``peer_name`` is the agent named by the peer's
    certificate; the caller compares it with what the peer says (Welcome)."""
    from agent.net.tls import PeerIdentityError, peer_identity

    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            transport, proto = await loop.create_connection(
                lambda: FrameProtocol(session), host, port, ssl=ssl_context,
                server_hostname="" if ssl_context is not None else None,
                ssl_handshake_timeout=timeout_s if ssl_context is not None else None)
    except ssl.SSLError as exc:
        raise PeerError(f"TLS handshake with {host}:{port} failed: {exc.reason or exc}",
                        int(ErrorCode.AUTH_FAILED)) from exc
    except (OSError, TimeoutError) as exc:
        raise PeerLost(f"cannot connect to {host}:{port}: {exc or 'timeout'}") from exc
    if ssl_context is not None:
        try:
            proto.peer_name = peer_identity(transport.get_extra_info("ssl_object"))
        except PeerIdentityError as exc:
            proto.close()
            raise PeerError(f"{host}:{port}: {exc}", int(ErrorCode.AUTH_FAILED)) from exc
    return proto
