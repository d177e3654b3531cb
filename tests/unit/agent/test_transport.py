"""FrameProtocol, the agent's receive path, driven as asyncio drives it.

The first tests call ``get_buffer``/``buffer_updated`` directly with
arbitrary read sizes (what a BufferedProtocol sees from the event loop) and
check that every read goes to exactly the right place: the decoder's buffers
for prefix and body, the payload sink's views of guest memory for page
payloads (the bounce buffer for batches of many small runs), never across a
frame boundary. The last ones run the protocol on a real loopback socket
under asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import mmap
import socket

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    PAGE_SIZE,
    PREFIX_SIZE,
    BatchFlags,
    ErrorCode,
    Message,
    MigrationSession,
    MsgType,
    PageBatch,
    RemoteProtocolError,
    Role,
    RoundAck,
    RoundEnd,
    encode_frame,
)
from protocol.framing import NEED_DATA, FrameDecoder

from agent.net.transport import SCATTER_AVG_BYTES, SCATTER_MIN_RUNS, FrameProtocol
from tests.unit.protocol.conftest import make_examples

EXAMPLES = make_examples()
NPAGES = 64


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


def scattered(batch: PageBatch) -> bool:
    """The transport's rule for the bounce buffer (many small runs)."""
    n = len(batch.runs)
    return n > SCATTER_MIN_RUNS and batch.payload_len <= SCATTER_AVG_BYTES * n


class Guest:
    """Guest RAM (real shared memory) and the sink that hands out views of it."""

    def __init__(self, npages: int = NPAGES) -> None:
        self.mem = mmap.mmap(-1, npages * PAGE_SIZE)
        self.view = memoryview(self.mem)
        self.npages = npages
        self.handed_out: list[memoryview] = []

    def sink(self, batch: PageBatch) -> list[memoryview]:
        for first, count in batch.runs:  # checked before any view exists, as the agent does
            if first + count > self.npages:
                raise RemoteProtocolError(f"pages {first}+{count} beyond {self.npages}", ErrorCode.MALFORMED)
        views = [self.view[first * PAGE_SIZE : (first + count) * PAGE_SIZE] for first, count in batch.runs]
        self.handed_out += views
        return views

    def close(self) -> None:
        for v in self.handed_out:
            v.release()
        self.view.release()
        self.mem.close()


def payload_of(batch: PageBatch, salt: int) -> bytes:
    return bytes((salt * 31 + i) & 0xFF for i in range(251)) * (batch.payload_len // 251) + bytes(
        batch.payload_len % 251
    )


class Stream:
    """Frames, their payloads, the expected guest memory, and the read plan:
    for every stream byte range, where the transport must put it."""

    def __init__(self, msgs: list[Message], npages: int = NPAGES) -> None:
        self.msgs = msgs
        self.data = bytearray()
        self.ram = bytearray(npages * PAGE_SIZE)
        #: (end offset, "frame" | "ram" | "bounce") per piece, in stream order
        self.pieces: list[tuple[int, str]] = []
        for i, msg in enumerate(msgs):
            frame = encode_frame(msg)
            start = len(self.data)
            self.data += frame
            self.pieces += [(start + PREFIX_SIZE, "frame"), (len(self.data), "frame")]
            if isinstance(msg, PageBatch) and msg.payload_len:
                payload = payload_of(msg, i)
                self.data += payload
                off = 0
                for first, count in msg.runs:
                    n = count * PAGE_SIZE
                    self.ram[first * PAGE_SIZE : first * PAGE_SIZE + n] = payload[off : off + n]
                    off += n
                    if not scattered(msg):
                        self.pieces.append((len(self.data) - msg.payload_len + off, "ram"))
                if scattered(msg):
                    self.pieces.append((len(self.data), "bounce"))

    def piece_at(self, pos: int) -> tuple[int, str]:
        return next(p for p in self.pieces if p[0] > pos)


def feed(proto: FrameProtocol, stream: Stream, sizes: list[int], guest: Guest) -> None:
    """What the event loop does: get_buffer, recv_into it (at most ``sizes[i]``
    bytes, as the socket happens to have them), buffer_updated."""
    pos = i = 0
    data = stream.data
    while pos < len(data):
        buf = proto.get_buffer(-1)
        end, where = stream.piece_at(pos)
        assert pos + len(buf) == end, "a read must end exactly at the current piece"
        if where == "ram":
            assert buf.obj is guest.mem, "payload must go straight into guest memory"
        else:
            assert buf.obj is not guest.mem
        n = min(len(buf), sizes[i % len(sizes)])
        i += 1
        buf[:n] = data[pos : pos + n]
        del buf  # as the loop does: the buffer is released before buffer_updated
        pos += n
        proto.buffer_updated(n)
        assert proto.failure is None, proto.failure


async def drain_inbox(proto: FrameProtocol, count: int) -> list[Message]:
    return [await proto.recv(timeout_s=5) for _ in range(count)]


# -- strategies ------------------------------------------------------------------------


@st.composite
def batches(draw) -> PageBatch:
    kind = draw(st.sampled_from(["direct", "scatter", "zero"]))
    nruns = draw(st.integers(1, SCATTER_MIN_RUNS)) if kind == "direct" else draw(st.integers(SCATTER_MIN_RUNS + 1, 12))
    runs = []
    for _ in range(nruns):
        count = draw(st.integers(1, 4))
        runs.append((draw(st.integers(0, NPAGES - count)), count))
    return page_batch(runs, BatchFlags.ZERO if kind == "zero" else BatchFlags.NONE, draw(st.integers(1, 9)))


round_ends = st.builds(RoundEnd, round=st.integers(1, 9), pages_sent=st.integers(0, 99), dirty_pages=st.integers(0, 99))
stream_msgs = st.lists(st.one_of(batches(), batches(), round_ends), max_size=10)
read_sizes = st.lists(st.integers(1, 3 * PAGE_SIZE), min_size=1, max_size=12)


# -- driven directly -------------------------------------------------------------------


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream_msgs, read_sizes)
def test_payload_lands_in_the_sink_views_whatever_the_read_sizes(msgs, sizes):
    stream = Stream(msgs)
    guest = Guest()

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        proto.payload_sink = guest.sink
        feed(proto, stream, sizes, guest)
        assert await drain_inbox(proto, len(msgs)) == msgs
        assert not proto._inbox
        assert proto.bytes_received == len(stream.data)
        assert bytes(guest.mem) == bytes(stream.ram)
        proto.eof_received()
        assert proto.failure is None  # EOF at a frame boundary is not an error

    try:
        asyncio.run(main())
    finally:
        guest.close()


def test_one_byte_reads():
    msgs = [
        page_batch([(1, 2)]),
        page_batch([(i, 1) for i in range(0, 20, 2)]),  # scatter
        RoundEnd(round=1, pages_sent=12, dirty_pages=0),
        page_batch([(40, 3)], BatchFlags.ZERO),
    ]
    stream = Stream(msgs)
    guest = Guest()

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        proto.payload_sink = guest.sink
        feed(proto, stream, [1], guest)
        assert await drain_inbox(proto, len(msgs)) == msgs
        assert bytes(guest.mem) == bytes(stream.ram)

    try:
        asyncio.run(main())
    finally:
        guest.close()


def test_sink_views_are_released_after_their_payload():
    guest = Guest()
    msg = page_batch([(0, 1), (5, 2)])
    stream = Stream([msg])

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        proto.payload_sink = guest.sink
        feed(proto, stream, [PAGE_SIZE], guest)
        assert len(guest.handed_out) == 2
        for v in guest.handed_out:
            with pytest.raises(ValueError):  # released: no view of guest memory outlives its batch
                v.tobytes()
        assert await proto.recv(timeout_s=5) == msg

    try:
        asyncio.run(main())
    finally:
        guest.close()


@pytest.mark.parametrize("cut", ["prefix", "body", "payload"])
def test_eof_inside_a_frame_is_truncated(cut):
    msg = page_batch([(0, 2)])
    frame = encode_frame(msg)
    upto = {"prefix": PREFIX_SIZE - 3, "body": len(frame) - 1, "payload": len(frame) + PAGE_SIZE}[cut]
    guest = Guest()

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        proto.payload_sink = guest.sink
        data = frame + payload_of(msg, 0)
        pos = 0
        while pos < upto:
            buf = proto.get_buffer(-1)
            n = min(len(buf), upto - pos)
            buf[:n] = data[pos : pos + n]
            del buf
            pos += n
            proto.buffer_updated(n)
        assert proto.failure is None
        assert proto.eof_received() is False
        assert isinstance(proto.failure, RemoteProtocolError)
        assert proto.failure.code is ErrorCode.TRUNCATED
        with pytest.raises(RemoteProtocolError):
            await proto.recv(timeout_s=5)

    try:
        asyncio.run(main())
    finally:
        guest.close()


def test_runs_beyond_guest_memory_fail_before_any_view():
    guest = Guest()
    bad = page_batch([(NPAGES - 1, 2)])

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        proto.payload_sink = guest.sink
        data = encode_frame(bad) + payload_of(bad, 0)
        pos = 0
        while pos < len(data):  # what follows the bad header is swallowed, never parsed
            buf = proto.get_buffer(-1)
            assert buf.obj is not guest.mem
            n = min(len(buf), len(data) - pos)
            buf[:n] = data[pos : pos + n]
            del buf
            pos += n
            proto.buffer_updated(n)
        assert isinstance(proto.failure, RemoteProtocolError)
        assert proto.failure.code is ErrorCode.MALFORMED
        assert guest.handed_out == []
        with pytest.raises(RemoteProtocolError):
            await proto.recv(timeout_s=5)

    try:
        asyncio.run(main())
    finally:
        guest.close()


def test_page_batch_without_a_sink_is_unexpected():
    msg = page_batch([(0, 1)])

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        frame = encode_frame(msg)
        pos = 0
        while pos < len(frame):
            buf = proto.get_buffer(-1)
            n = len(buf)
            buf[:] = frame[pos : pos + n]
            del buf
            pos += n
            proto.buffer_updated(n)
        assert proto.failure is not None and proto.failure.code is ErrorCode.UNEXPECTED

    asyncio.run(main())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(1, 64), min_size=1, max_size=8), st.data())
def test_garbage_never_escapes_buffer_updated(data, sizes, draw):
    if draw.draw(st.booleans()):  # often a valid start that goes wrong later
        msgs = draw.draw(st.lists(st.one_of(batches(), round_ends), min_size=1, max_size=3))
        good = Stream(msgs).data
        data = bytes(good[: draw.draw(st.integers(0, len(good)))]) + data
    guest = Guest()

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        proto.payload_sink = guest.sink
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

    try:
        asyncio.run(main())
    finally:
        guest.close()


# -- on a real socket ------------------------------------------------------------------


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_real_socket_payloads_and_round_acks(loop_kind):
    """A peer sends a transfer in odd-sized writes over 127.0.0.1; the
    destination's FrameProtocol puts the pages in guest memory before it hands
    over each RoundEnd, and the RoundAck the driver sends for it reaches the peer."""
    rounds = 3
    msgs: list[Message] = []
    for r in range(1, rounds + 1):
        msgs += [
            page_batch([(r, 4), (20 + r, 8)], round_=r),
            page_batch([(i, 1) for i in range(30 + r, 60, 3)], round_=r),  # scatter
            page_batch([(10, 2)], BatchFlags.ZERO, round_=r),
            RoundEnd(round=r, pages_sent=22, dirty_pages=0),
        ]
    stream = Stream(msgs)
    guest = Guest()
    received: list[Message] = []
    acks: list[Message] = []

    async def main() -> None:
        proto = FrameProtocol(transfer_session())
        proto.payload_sink = guest.sink
        server = await asyncio.get_running_loop().create_server(lambda: proto, "127.0.0.1", 0)
        host, port = server.sockets[0].getsockname()[:2]
        reader, writer = await asyncio.open_connection(host, port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
            assert bytes(guest.mem) == bytes(stream.ram)
            decoder = FrameDecoder()
            while len(acks) < rounds:
                chunk = await asyncio.wait_for(reader.read(4096), 10)
                assert chunk, "destination closed before acking every round"
                decoder.receive_data(chunk)
                while (event := decoder.next_event()) is not NEED_DATA:
                    acks.append(event)
            assert proto.failure is None
        finally:
            writer.close()
            await writer.wait_closed()
            await proto.wait_closed(timeout_s=5)
            server.close()
            await server.wait_closed()

    runner = asyncio.run if loop_kind == "asyncio" else uvloop.run
    try:
        runner(main())
    finally:
        guest.close()
    assert received == msgs
    assert acks == [RoundAck(round=r) for r in range(1, rounds + 1)]
