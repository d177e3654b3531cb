"""FrameProtocol, the agent's control connection, driven as asyncio drives it.

Pages no longer travel here (protocol v3: they go on data streams, see
tests/unit/agent/test_datastream.py); a control connection carries only
control messages, and a PageBatch on it is a protocol error answered with
Abort.

The first tests call ``get_buffer``/``buffer_updated`` directly with
arbitrary read sizes (what a BufferedProtocol sees from the event loop) and
check that every read goes to exactly the decoder's buffer of the current
prefix or body, never across a frame boundary; then the limits (body size
before authentication, the bounded inbox, write backpressure) and the
sticky error. The last ones run the protocol on a real loopback socket
under asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    PAGE_SIZE,
    PREFIX_SIZE,
    Abort,
    BatchFlags,
    ErrorCode,
    Join,
    LocalProtocolError,
    Message,
    MigrationSession,
    MsgType,
    PageBatch,
    RemoteProtocolError,
    Role,
    RoundAck,
    RoundEnd,
    SectionState,
    encode_frame,
)
from protocol.framing import NEED_DATA, FrameDecoder

from agent.errors import PeerError, PeerLost
from agent.net import transport as transport_mod
from agent.net.transport import INBOX_LIMIT, PRE_AUTH_MAX_BODY, FrameProtocol
from tests.unit.protocol.conftest import make_examples

pytestmark = pytest.mark.timeout(60)

EXAMPLES = make_examples()


def transfer_session() -> MigrationSession:
    """A destination session that has reached TRANSFER (Hello, Welcome, Prepare, Ready)."""
    session = MigrationSession(Role.DESTINATION)
    session.receive(EXAMPLES[MsgType.HELLO])
    session.send(EXAMPLES[MsgType.WELCOME])
    session.receive(EXAMPLES[MsgType.PREPARE])
    session.send(EXAMPLES[MsgType.READY])
    return session


def page_batch(runs, flags=BatchFlags.NONE, round_=1) -> PageBatch:
    pages = sum(count for _, count in runs)
    return dataclasses.replace(
        EXAMPLES[MsgType.PAGE_BATCH],
        round=round_,
        runs=tuple(runs),
        flags=flags,
        payload_len=0 if flags & BatchFlags.ZERO else pages * PAGE_SIZE,
    )


class Stream:
    """Frames of control messages and the read plan: the end offset of
    every piece (prefix, body) in stream order."""

    def __init__(self, msgs: list[Message]) -> None:
        self.msgs = msgs
        self.data = bytearray()
        self.ends: list[int] = []
        for msg in msgs:
            frame = encode_frame(msg)
            start = len(self.data)
            self.data += frame
            self.ends += [start + PREFIX_SIZE, len(self.data)]

    def piece_end(self, pos: int) -> int:
        return next(e for e in self.ends if e > pos)


def feed(proto: FrameProtocol, stream: Stream, sizes: list[int]) -> None:
    """What the event loop does: get_buffer, recv_into it (at most ``sizes[i]``
    bytes, as the socket happens to have them), buffer_updated."""
    pos = i = 0
    data = stream.data
    while pos < len(data):
        buf = proto.get_buffer(-1)
        assert pos + len(buf) == stream.piece_end(pos), "a read must end exactly at the current piece"
        n = min(len(buf), sizes[i % len(sizes)])
        i += 1
        buf[:n] = data[pos : pos + n]
        del buf  # as the loop does: the buffer is released before buffer_updated
        pos += n
        proto.buffer_updated(n)
        assert proto.failure is None, proto.failure


def push(proto: FrameProtocol, data: bytes, size: int = 1 << 20) -> list[memoryview]:
    """Feed ``data`` whatever ``get_buffer`` asks for; returns the buffers it handed out."""
    handed = []
    pos = 0
    while pos < len(data):
        buf = proto.get_buffer(-1)
        handed.append(buf)
        n = min(len(buf), size, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        pos += n
        proto.buffer_updated(n)
    return handed


async def drain_inbox(proto: FrameProtocol, count: int) -> list[Message]:
    return [await proto.recv(timeout_s=5) for _ in range(count)]


class FakeTransport:
    """The calls FrameProtocol makes on its transport, recorded."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.calls: list[str] = []
        self.closing = False
        self.eof = False

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 4242) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def write(self, data) -> None:
        assert not self.closing
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        self.calls.append("close")

    def abort(self) -> None:
        self.closing = True
        self.calls.append("abort")

    def frames(self) -> list:
        dec = FrameDecoder()
        dec.receive_data(bytes(self.written))
        out = []
        while (ev := dec.next_event()) is not NEED_DATA:
            out.append(ev)
        return out


# -- strategies ------------------------------------------------------------------------

round_ends = st.builds(RoundEnd, round=st.integers(1, 9), pages_sent=st.integers(0, 99), dirty_pages=st.integers(0, 99))
section_states = st.builds(SectionState, section=st.integers(0, 2), data=st.binary(max_size=3 * PAGE_SIZE))
control_msgs = st.lists(st.one_of(round_ends, section_states), max_size=10)
read_sizes = st.lists(st.integers(1, 3 * PAGE_SIZE), min_size=1, max_size=12)


@st.composite
def batches(draw) -> PageBatch:
    runs = [(draw(st.integers(0, 60)), draw(st.integers(1, 4))) for _ in range(draw(st.integers(1, 6)))]
    zero = draw(st.booleans())
    return page_batch(runs, BatchFlags.ZERO if zero else BatchFlags.NONE, draw(st.integers(1, 9)))


# -- driven directly -------------------------------------------------------------------


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(control_msgs, read_sizes)
def test_messages_arrive_in_order_whatever_the_read_sizes(msgs, sizes):
    stream = Stream(msgs)

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        feed(proto, stream, sizes)
        assert await drain_inbox(proto, len(msgs)) == msgs
        assert not proto._inbox
        assert proto.bytes_received == len(stream.data)
        proto.eof_received()
        assert proto.failure is None  # EOF at a frame boundary is not an error

    asyncio.run(main())


def test_one_byte_reads():
    msgs = [
        RoundEnd(round=1, pages_sent=12, dirty_pages=0),
        SectionState(section=2, data=bytes(range(256)) * 20),
        RoundEnd(round=2, pages_sent=0, dirty_pages=0),
    ]
    stream = Stream(msgs)

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        feed(proto, stream, [1])
        assert await drain_inbox(proto, len(msgs)) == msgs

    asyncio.run(main())


@pytest.mark.parametrize("cut", ["prefix", "body"])
def test_eof_inside_a_frame_is_truncated(cut):
    frame = encode_frame(SectionState(section=0, data=b"\x07" * 100))
    upto = {"prefix": PREFIX_SIZE - 3, "body": len(frame) - 1}[cut]

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        push(proto, frame[:upto])
        assert proto.failure is None
        assert proto.eof_received() is False
        assert isinstance(proto.failure, RemoteProtocolError)
        assert proto.failure.code is ErrorCode.TRUNCATED
        with pytest.raises(RemoteProtocolError):
            await proto.recv(timeout_s=5)

    asyncio.run(main())


@pytest.mark.parametrize("zero", [False, True], ids=["with-payload", "zero"])
def test_page_batch_on_the_control_connection_is_unexpected(zero):
    """Refused by the session when its body is parsed, before a payload is
    announced: the payload and whatever follows go to the discard buffer,
    never parsed; the peer gets Abort(UNEXPECTED) and a half-close."""
    msg = page_batch([(0, 2), (9, 1)], BatchFlags.ZERO if zero else BatchFlags.NONE)
    after = encode_frame(RoundEnd(round=1, pages_sent=3, dirty_pages=0))

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        tr = FakeTransport()
        proto.connection_made(tr)
        frame = encode_frame(msg)
        push(proto, frame)
        assert isinstance(proto.failure, RemoteProtocolError)
        assert proto.failure.code is ErrorCode.UNEXPECTED
        discard = proto.get_buffer(-1)
        rest = b"\x55" * msg.payload_len + after
        for buf in push(proto, rest):
            assert buf.obj is discard.obj          # swallowed, never a decoder buffer
        assert not proto._inbox                    # the RoundEnd behind it was never parsed
        [abort] = tr.frames()
        assert isinstance(abort, Abort) and abort.code is ErrorCode.UNEXPECTED
        assert "PageBatch" in abort.reason
        assert tr.eof                              # lingering close: half-closed, not reset
        with pytest.raises(RemoteProtocolError) as exc:
            await proto.recv(timeout_s=5)
        assert exc.value is proto.failure

    asyncio.run(main())


def test_a_payload_after_a_join_on_a_control_connection_is_unexpected():
    """A session that took a Join (a data stream's first frame, sent without
    the data-stream magic) admits a PageBatch: its payload is refused by the
    transport, before any byte of it is read into anything but the discard."""
    mid = "mig-0001"
    src = MigrationSession(Role.SOURCE)
    data = src.send(Join(migration_id=mid, stream=0, token=bytes(16)))
    batch = page_batch([(3, 2)])
    data += src.send(batch)

    async def main() -> None:
        proto = FrameProtocol(MigrationSession(Role.DESTINATION))
        tr = FakeTransport()
        proto.connection_made(tr)
        push(proto, data)
        assert isinstance(proto.failure, RemoteProtocolError)
        assert proto.failure.code is ErrorCode.UNEXPECTED
        assert "payload" in proto.failure.reason
        discard = proto.get_buffer(-1)
        for buf in push(proto, b"\xaa" * batch.payload_len):
            assert buf.obj is discard.obj
        [abort] = tr.frames()
        assert isinstance(abort, Abort) and abort.code is ErrorCode.UNEXPECTED

    asyncio.run(main())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(1, 64), min_size=1, max_size=8), st.data())
def test_garbage_never_escapes_buffer_updated(data, sizes, draw):
    if draw.draw(st.booleans()):  # often a valid start that goes wrong later
        msgs = draw.draw(st.lists(st.one_of(round_ends, section_states, batches()), min_size=1, max_size=3))
        good = Stream(msgs).data
        data = bytes(good[: draw.draw(st.integers(0, len(good)))]) + data

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        pos = i = 0
        while pos < len(data):
            buf = proto.get_buffer(-1)
            assert len(buf) > 0
            n = min(len(buf), sizes[i % len(sizes)], len(data) - pos)
            i += 1
            buf[:n] = data[pos : pos + n]
            del buf
            pos += n
            proto.buffer_updated(n)  # never raises: errors become the sticky failure
        proto.eof_received()
        assert proto.failure is None or isinstance(proto.failure, RemoteProtocolError)

    asyncio.run(main())


def _section_state_with_body(body_len: int) -> SectionState:
    k = body_len
    for _ in range(3):   # the msgpack overhead depends (a little) on the length
        msg = SectionState(section=0, data=b"\x01" * k)
        k += body_len - (len(encode_frame(msg)) - PREFIX_SIZE)
    msg = SectionState(section=0, data=b"\x01" * k)
    assert len(encode_frame(msg)) - PREFIX_SIZE == body_len
    return msg


def test_body_limit_before_authentication():
    """``max_body_bytes`` (the endpoint sets PRE_AUTH_MAX_BODY until the peer
    is authenticated): a body at the limit is read; one byte more is refused
    on its prefix (TOO_LARGE), before a byte of its body is buffered."""
    at_limit = _section_state_with_body(PRE_AUTH_MAX_BODY)
    over = _section_state_with_body(PRE_AUTH_MAX_BODY + 1)

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        proto.max_body_bytes = PRE_AUTH_MAX_BODY
        push(proto, encode_frame(at_limit))
        assert proto.failure is None
        assert await proto.recv(timeout_s=5) == at_limit

        tr = FakeTransport()
        proto.connection_made(tr)
        frame = encode_frame(over)
        push(proto, frame[:PREFIX_SIZE])
        assert proto.failure is None                     # the prefix alone is fine ...
        buf = proto.get_buffer(-1)                        # ... its body is not asked for
        assert isinstance(proto.failure, RemoteProtocolError) and proto.failure.code is ErrorCode.TOO_LARGE
        assert len(buf) == transport_mod.DISCARD_BYTES and proto._decoder.buffered == 0
        [abort] = tr.frames()
        assert isinstance(abort, Abort) and abort.code is ErrorCode.TOO_LARGE

        proto.max_body_bytes = transport_mod.MAX_FRAME_BYTES     # authenticated: the same frame is fine
        fresh = FrameProtocol(transfer_session())
        push(fresh, frame)
        assert fresh.failure is None and await fresh.recv(timeout_s=5) == over

    asyncio.run(main())


def test_inbox_backpressure_pauses_and_resumes_reading():
    msgs = [RoundEnd(round=r, pages_sent=0, dirty_pages=0) for r in range(1, INBOX_LIMIT + 11)]

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        tr = FakeTransport()
        proto.connection_made(tr)
        push(proto, b"".join(encode_frame(m) for m in msgs[:INBOX_LIMIT - 1]))
        assert tr.calls == []
        push(proto, encode_frame(msgs[INBOX_LIMIT - 1]))
        assert tr.calls == ["pause_reading"]             # the inbox is full
        push(proto, b"".join(encode_frame(m) for m in msgs[INBOX_LIMIT:]))   # bytes already on their way
        assert tr.calls == ["pause_reading"]
        got = []
        while len(proto._inbox) > INBOX_LIMIT // 2:      # after each recv at least half are left
            got.append(await proto.recv(timeout_s=5))
            assert tr.calls == ["pause_reading"]
        got.append(await proto.recv(timeout_s=5))
        assert tr.calls == ["pause_reading", "resume_reading"]    # below half: reading again
        got += await drain_inbox(proto, len(proto._inbox))
        assert got == msgs

    asyncio.run(main())


def test_write_backpressure_stops_reading_and_send_waits():
    """A peer that does not read our answers is not read from either, and
    ``send`` waits until the transport drains (or fails after its timeout)."""

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        tr = FakeTransport()
        proto.connection_made(tr)
        proto.pause_writing()
        assert tr.calls == ["pause_reading"]
        sent = asyncio.ensure_future(proto.send(RoundAck(round=1), timeout_s=10))
        stepped = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(stepped.set_result, None)   # after the send's first step: FIFO
        await stepped
        assert not sent.done() and tr.frames() == [RoundAck(round=1)]
        # the inbox draining below half must not resume reading while writes are paused
        push(proto, b"".join(encode_frame(RoundEnd(round=r, pages_sent=0, dirty_pages=0))
                             for r in range(1, INBOX_LIMIT + 1)))
        await drain_inbox(proto, INBOX_LIMIT)
        assert "resume_reading" not in tr.calls
        proto.resume_writing()
        await asyncio.wait_for(sent, 5)
        assert tr.calls[-1] == "resume_reading"

        proto.pause_writing()
        with pytest.raises(PeerLost, match="stopped reading"):
            await proto.send(RoundAck(round=2), timeout_s=0.05)
        assert tr.closing and isinstance(proto.failure, PeerLost)
        with pytest.raises(PeerLost):                # sticky
            await proto.send(RoundAck(round=3))

    asyncio.run(main())


def test_errors_are_sticky():
    async def main() -> None:
        # an Abort from the peer: every later recv/send raises it
        proto = FrameProtocol(transfer_session())
        proto.connection_made(FakeTransport())
        push(proto, encode_frame(Abort(code=ErrorCode.CANCELLED, reason="operator")))
        for _ in range(2):
            with pytest.raises(PeerError, match="operator") as exc:
                await proto.recv(timeout_s=5)
            assert exc.value.code == ErrorCode.CANCELLED
        with pytest.raises(PeerError):
            await proto.send(RoundAck(round=1))

        # a protocol error: the first one is kept, whatever comes later
        proto = FrameProtocol(transfer_session())
        proto.connection_made(FakeTransport())
        push(proto, b"NOPE" + bytes(12))
        first = proto.failure
        assert isinstance(first, RemoteProtocolError) and first.code is ErrorCode.BAD_MAGIC
        proto.connection_lost(None)
        proto.fail(PeerLost("later"))
        assert proto.failure is first
        with pytest.raises(RemoteProtocolError):
            await proto.recv(timeout_s=5)

        # a send the session refuses raises locally and changes nothing on the wire
        proto = FrameProtocol(transfer_session())
        tr = FakeTransport()
        proto.connection_made(tr)
        with pytest.raises(LocalProtocolError):
            await proto.send(page_batch([(0, 1)]))
        assert tr.written == b""

        # no message for too long: PeerLost, and the connection is closed
        proto = FrameProtocol(transfer_session())
        tr = FakeTransport()
        proto.connection_made(tr)
        with pytest.raises(PeerLost, match="no message"):
            await proto.recv(timeout_s=0.05)
        assert tr.closing
        with pytest.raises(PeerLost):
            await proto.recv(timeout_s=5)

    asyncio.run(main())


# -- on a real socket ------------------------------------------------------------------


async def _serve(proto: FrameProtocol):
    server = await asyncio.get_running_loop().create_server(lambda: proto, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    reader, writer = await asyncio.open_connection(host, port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server, reader, writer


async def _read_frames(reader, decoder: FrameDecoder, until) -> list:
    out: list = []
    while not until(out):
        chunk = await asyncio.wait_for(reader.read(4096), 10)
        if not chunk:
            decoder.receive_data(b"")
            assert decoder.next_event() is not NEED_DATA   # CLOSED at a frame boundary
            out.append("EOF")
            return out
        decoder.receive_data(chunk)
        while (event := decoder.next_event()) is not NEED_DATA:
            out.append(event)
    return out


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_real_socket_control_messages_and_round_acks(loop_kind):
    """A peer sends rounds of control messages in odd-sized writes over
    127.0.0.1; the destination's FrameProtocol hands them over in order, and
    the RoundAck the driver sends for each RoundEnd reaches the peer."""
    rounds = 3
    msgs: list[Message] = []
    for r in range(1, rounds + 1):
        msgs += [
            SectionState(section=r % 3, data=bytes([r]) * (5000 * r)),
            RoundEnd(round=r, pages_sent=22, dirty_pages=0),
        ]
    stream = Stream(msgs)
    received: list[Message] = []
    acks: list = []

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        server, reader, writer = await _serve(proto)
        try:
            data, pos, step = bytes(stream.data), 0, 1
            while pos < len(data):
                writer.write(data[pos : pos + step])
                await writer.drain()
                pos += step
                step = step * 7 % 9973 + 1  # 1, 8, 57, 400, ... odd sizes across boundaries
            for _ in msgs:
                msg = await proto.recv(timeout_s=10)
                received.append(msg)
                if isinstance(msg, RoundEnd):     # as the destination driver does
                    await proto.send(RoundAck(round=msg.round))
            acks.extend(await _read_frames(reader, FrameDecoder(), lambda out: len(out) >= rounds))
            assert proto.failure is None
        finally:
            writer.close()
            await writer.wait_closed()
            await proto.wait_closed(timeout_s=5)
            server.close()
            await server.wait_closed()

    runner = asyncio.run if loop_kind == "asyncio" else uvloop.run
    runner(main())
    assert received == msgs
    assert acks == [RoundAck(round=r) for r in range(1, rounds + 1)]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_real_socket_page_batch_is_answered_with_abort_unexpected(loop_kind):
    """A peer that still sends pages on the control connection (protocol v2
    style) gets Abort(UNEXPECTED), then EOF: the lingering close reads and
    drops what it still sends (the payload, more frames) instead of
    resetting the connection under our Abort."""
    batch = page_batch([(0, 16), (40, 8)])
    payload = b"\xab" * batch.payload_len
    more = encode_frame(RoundEnd(round=1, pages_sent=24, dirty_pages=0))

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        server, reader, writer = await _serve(proto)
        try:
            writer.write(encode_frame(RoundEnd(round=1, pages_sent=0, dirty_pages=0)))
            assert await proto.recv(timeout_s=10) == RoundEnd(round=1, pages_sent=0, dirty_pages=0)
            writer.write(encode_frame(batch) + payload + more)
            await writer.drain()
            got = await _read_frames(reader, FrameDecoder(), lambda out: False)
            assert len(got) == 2 and got[1] == "EOF", got
            abort = got[0]
            assert isinstance(abort, Abort) and abort.code is ErrorCode.UNEXPECTED
            assert "PageBatch" in abort.reason
            assert isinstance(proto.failure, RemoteProtocolError) and proto.failure.code is ErrorCode.UNEXPECTED
            with pytest.raises(RemoteProtocolError):
                await proto.recv(timeout_s=5)
        finally:
            writer.close()
            await writer.wait_closed()
            await proto.wait_closed(timeout_s=5)
            server.close()
            await server.wait_closed()

    runner = asyncio.run if loop_kind == "asyncio" else uvloop.run
    runner(main())
