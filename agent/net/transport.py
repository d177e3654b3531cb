"""The IO adapter between asyncio and the sans-IO protocol, for a control connection.

``FrameProtocol`` is an ``asyncio.BufferedProtocol`` driving the one frame
parser, ``protocol.framing.FrameDecoder``, with exact reads: ``get_buffer``
returns the decoder's view of exactly the bytes still missing from the
current prefix or body, so nothing is ever read past a frame boundary::

    prefix(16) | body(body_len) | prefix(16) | body(body_len) ...
    get_buffer: decoder.get_buffer(), every time

A control connection carries only control messages (Hello ... Ready,
RoundEnd/RoundAck, SectionState, the switchover, Query, Abort). The pages
of a migration travel on its data streams (protocol v3), connections of
their own served by threads that receive straight into guest memory: see
``agent/net/datastream.py``. A PageBatch here is refused by the session
(``UNEXPECTED``) before its payload is announced; a payload announced
anyway (a session that took a Join) is refused the same way and never read
into anything but the discard buffer.

Messages go to a bounded inbox; reading pauses while the inbox is full.
Writes are ``transport.write`` of the encoded frame, followed by
``drain()`` while the write buffer is above its high-water mark; a peer
that stops reading our answers is not read from either.

With TLS (``agent.net.tls``) the same protocol sits on asyncio's SSL
transport, which drives a BufferedProtocol the same way.

Until the peer is authenticated (``max_body_bytes``, raised by the
endpoint's handshake gate) a frame body may not exceed PRE_AUTH_MAX_BODY:
an unauthenticated peer cannot make the agent hold megabytes per connection.

Any protocol error is answered with Abort, then a lingering close (the
peer's further input is read into a discard buffer and dropped, so our
Abort is not lost to a reset); only a TLS peer not yet authenticated
(``refuse_silently``) is cut off unanswered. Errors follow QEMU's sticky-error rule: the
first failure (protocol error, Abort from the peer, connection lost, IO
timeout) is recorded, every later ``send``/``recv`` raises it, and it is
recorded *before* the transport is closed.
"""
from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Any, Callable

from protocol import (
    CLOSED,
    NEED_DATA,
    Abort,
    ErrorCode,
    LocalProtocolError,
    Message,
    MigrationSession,
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
DISCARD_BYTES = 65536           # read size while lingering after a protocol error
PRE_AUTH_MAX_BODY = 64 * 1024   # largest frame body before authentication (a Hello is < 4 KiB)


class FrameProtocol(asyncio.BufferedProtocol):
    def __init__(self, session: MigrationSession, on_connect: Callable[["FrameProtocol"], None] | None = None) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
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
        # read side: the decoder owns every byte (prefix and body). Pass-through
        # mode, so that a payload is announced (PayloadFollows) and refused,
        # never buffered or copied by the decoder.
        self._decoder = FrameDecoder(payload_passthrough=True)
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
        if self._discard is not None:       # lingering after an error: dropped unparsed
            return
        try:
            self._decoder.buffer_updated(nbytes)
            self._pump()
        except ProtocolError as exc:
            self._protocol_error(exc)
        except Exception as exc:  # a bug must not kill the loop: the peer is told, the connection fails
            self._protocol_error(RemoteProtocolError(f"internal error: {exc!r}", ErrorCode.INTERNAL))

    def _pump(self) -> None:
        """Take every event the decoder has, up to more needed bytes."""
        decoder = self._decoder
        while True:
            event = decoder.next_event()
            if event is NEED_DATA or event is CLOSED:
                return
            if type(event) is PayloadFollows:
                # The session refuses a PageBatch on a control connection; one
                # that took a Join does not, and its payload is refused here.
                raise RemoteProtocolError("page payload on a control connection (pages go on data streams)",
                                          ErrorCode.UNEXPECTED)
            self._deliver(self.session.receive(event))

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
            # Without its traceback: it is kept (and raised again) as long as the
            # connection, and the parser's frames are no use to whoever raises it.
            self.failure = exc.with_traceback(None)
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
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.failure is None:
            self.failure = PeerLost(f"connection to {self.peer} lost" + (f": {exc}" if exc else " (EOF)"))
        # Nothing more is parsed: free a partly received body (up to 4 MiB)
        # now, not when the cyclic GC gets to this protocol.
        self._decoder = FrameDecoder(payload_passthrough=True)
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

    async def send(self, msg: Message, *, timeout_s: float = 30.0) -> None:
        self.check()
        self.transport.write(self.session.send(msg))
        if not self._write_ok.is_set():
            await self.drain(timeout_s)

    async def drain(self, timeout_s: float = 30.0) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await self._write_ok.wait()
        except TimeoutError:
            self.fail(PeerLost(f"peer {self.peer} stopped reading for {timeout_s:.0f} s"))
        self.check()

    async def recv(self, timeout_s: float = 30.0, progress: Callable[[], int] | None = None) -> Message:
        """Next message from the peer; raises the sticky failure or PeerLost on
        timeout. ``progress`` (a counter, e.g. bytes the migration's data
        streams received): a timeout while it moved is not one, the wait
        goes on (a long pre-copy round sends nothing on this connection)."""
        seen = progress() if progress is not None else 0
        while not self._inbox:
            self.check()
            loop = asyncio.get_running_loop()
            self._inbox_waiter = loop.create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._inbox_waiter
            except TimeoutError:
                now = progress() if progress is not None else seen
                if now != seen:
                    seen = now
                    continue
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
