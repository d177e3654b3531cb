"""Property tests of the production frame decoder's zero-copy paths.

``FrameDecoder(payload_passthrough=True)`` is what the agent's transport
drives: exact reads (``get_buffer``/``buffer_updated``) for prefix and body,
``PayloadFollows`` then the caller's own buffers for page payloads. These
tests feed it streams of frames in arbitrary pieces, both as chunks
(``receive_data`` + ``readinto_payload``) and as exact reads, and check that
the messages, the payload bytes in the target buffers and the read
boundaries are the same whatever the piece sizes.

Messages come from the shared example table plus generated page batches, so
the tests follow the message catalogue as it changes.
"""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    CLOSED,
    MAGIC,
    MAX_INCOMPLETE_FRAME_BYTES,
    NEED_DATA,
    PAGE_SIZE,
    PREFIX,
    PREFIX_SIZE,
    BatchFlags,
    ErrorCode,
    Message,
    MsgType,
    PageBatch,
    RemoteProtocolError,
    encode_frame,
)
from protocol.framing import FrameDecoder, PayloadFollows
from tests.unit.protocol.conftest import make_examples

EXAMPLES = make_examples()
BATCH = EXAMPLES[MsgType.PAGE_BATCH]


@st.composite
def page_batches(draw, max_pages: int = 6, max_runs: int = 4) -> PageBatch:
    counts = draw(st.lists(st.integers(1, 3), min_size=1, max_size=max_runs))
    while sum(counts) > max_pages and len(counts) > 1:
        counts.pop()
    counts[0] = min(counts[0], max_pages)
    firsts = draw(st.lists(st.integers(0, 2**40), min_size=len(counts), max_size=len(counts)))
    flags = draw(st.sampled_from([BatchFlags.NONE, BatchFlags.NONE, BatchFlags.ZERO]))
    return dataclasses.replace(
        BATCH,
        round=draw(st.integers(0, 100)),
        runs=tuple(zip(firsts, counts)),
        flags=flags,
        payload_len=0 if flags & BatchFlags.ZERO else sum(counts) * PAGE_SIZE,
    )


frames = st.one_of(page_batches(), st.sampled_from(list(EXAMPLES.values())))


def payload_of(msg: Message, salt: int) -> bytes:
    n = msg.payload_len if isinstance(msg, PageBatch) else 0
    return bytes((salt + i * 7) & 0xFF for i in range(256)) * (n // 256)


def encode_stream(msgs: list[Message]) -> tuple[bytes, list[bytes], list[int]]:
    """The stream, each message's payload, and every piece boundary in it
    (prefix, body, and each run of a payload: where one target buffer ends)."""
    stream = bytearray()
    payloads: list[bytes] = []
    bounds: list[int] = []
    for i, msg in enumerate(msgs):
        frame = encode_frame(msg)
        payload = payload_of(msg, i)
        stream += frame
        bounds += [len(stream) - len(frame) + PREFIX_SIZE, len(stream)]
        if payload:
            for _, count in msg.runs:
                bounds.append(bounds[-1] + count * PAGE_SIZE)
            stream += payload
            assert bounds[-1] == len(stream)
        payloads.append(payload)
    return bytes(stream), payloads, bounds


def run_targets(msg: PageBatch) -> list[bytearray]:
    """Where a sink would put each run: one buffer per run, like guest RAM slices."""
    return [bytearray(count * PAGE_SIZE) for _, count in msg.runs]


class Collector:
    """What a caller of the decoder does with its events: keep messages and
    put each batch's payload into its run buffers."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.payloads: list[bytes] = []
        self.targets: list[bytearray] = []
        self.ti = 0
        self.got = 0

    def message(self, msg: Message) -> None:
        self.messages.append(msg)
        self.targets = run_targets(msg) if isinstance(msg, PageBatch) and msg.payload_len else []
        self.ti = self.got = 0
        if not self.targets:
            self.payloads.append(b"")

    def current(self) -> memoryview:
        return memoryview(self.targets[self.ti])[self.got :]

    def filled(self, n: int) -> None:
        self.got += n
        if self.got == len(self.targets[self.ti]):
            self.ti, self.got = self.ti + 1, 0
            if self.ti == len(self.targets):
                self.payloads.append(b"".join(self.targets))
                self.targets = []


def decode_chunks(stream: bytes, sizes: list[int]) -> Collector:
    decoder = FrameDecoder(payload_passthrough=True)
    out = Collector()
    pos = i = 0
    while True:
        chunk = stream[pos : pos + sizes[i % len(sizes)]]
        pos += len(chunk)
        i += 1
        decoder.receive_data(chunk)
        while (event := decoder.next_event()) is not NEED_DATA:
            if event is CLOSED:
                assert not chunk and not out.targets
                return out
            if isinstance(event, PayloadFollows):
                assert event.nbytes == decoder.payload_remaining > 0
                n = decoder.readinto_payload(out.current())
                if not n:
                    assert decoder.buffered == 0
                    break  # the rest is still in the stream
                out.filled(n)
            else:
                out.message(event)
        assert decoder.buffered <= MAX_INCOMPLETE_FRAME_BYTES
        assert chunk, "EOF must give CLOSED"


def decode_exact(stream: bytes, sizes: list[int], bounds: list[int]) -> Collector:
    """Drive the decoder as a BufferedProtocol does: each read goes into the
    view it was given and holds at most ``sizes[i]`` bytes."""
    decoder = FrameDecoder(payload_passthrough=True)
    out = Collector()
    pos = i = 0
    while pos < len(stream):
        limit = sizes[i % len(sizes)]
        i += 1
        view = out.current() if out.targets else decoder.get_buffer()
        # Exact reads: the view ends at the next piece boundary, never beyond.
        assert pos + len(view) == min(b for b in bounds if b > pos)
        n = min(len(view), limit)
        view[:n] = stream[pos : pos + n]
        pos += n
        if out.targets:
            decoder.payload_received(n)
            out.filled(n)
        else:
            decoder.buffer_updated(n)
        if out.targets:
            continue
        while (event := decoder.next_event()) is not NEED_DATA:
            if isinstance(event, PayloadFollows):
                assert event.nbytes == sum(map(len, out.targets))
                break
            out.message(event)
    decoder.receive_data(b"")
    assert decoder.next_event() is CLOSED
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(frames, max_size=8),
    st.lists(st.integers(1, 3 * PAGE_SIZE), min_size=1, max_size=12),
    st.lists(st.integers(1, 3 * PAGE_SIZE), min_size=1, max_size=12),
)
def test_any_pieces_give_the_same_messages_and_payload_bytes(msgs, chunk_sizes, read_sizes):
    stream, payloads, bounds = encode_stream(msgs)
    for out in (
        decode_chunks(stream, [len(stream) + 1]),  # whole
        decode_chunks(stream, chunk_sizes),
        decode_exact(stream, [1 << 30], bounds),  # as large as the views allow
        decode_exact(stream, read_sizes, bounds),
    ):
        assert out.messages == msgs
        assert out.payloads == payloads


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(page_batches(max_pages=2, max_runs=2), min_size=1, max_size=3))
def test_byte_at_a_time(msgs):
    stream, payloads, bounds = encode_stream(msgs)
    for out in (decode_chunks(stream, [1]), decode_exact(stream, [1], bounds)):
        assert out.messages == msgs and out.payloads == payloads


# -- garbage ---------------------------------------------------------------------------


@st.composite
def garbage(draw) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:
        return MAGIC + draw(st.binary(max_size=300))
    if kind == 2:
        body = draw(st.binary(max_size=200))
        return PREFIX.pack(
            MAGIC,
            draw(st.integers(0, 25)),
            draw(st.sampled_from([0, 0, 0, 1])),
            draw(st.one_of(st.just(len(body)), st.integers(0, 2**32 - 1))),
            draw(st.one_of(st.just(0), st.just(PAGE_SIZE), st.integers(0, 2**32 - 1))),
        ) + body + draw(st.binary(max_size=50))
    msgs = draw(st.lists(frames, min_size=1, max_size=3))
    data = bytearray(encode_stream(msgs)[0])
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))]) + draw(st.binary(max_size=8))


def _expect_only_remote_errors(feed) -> None:
    try:
        feed()
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)


@settings(max_examples=300, deadline=None)
@given(garbage(), st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_garbage_in_passthrough_mode_only_raises_remote_protocol_error(data, sizes):
    def chunks() -> None:
        decoder = FrameDecoder(payload_passthrough=True)
        sink = bytearray(1 << 16)
        pos = i = 0
        while True:
            chunk = data[pos : pos + sizes[i % len(sizes)]]
            pos += len(chunk)
            i += 1
            decoder.receive_data(chunk)
            while (event := decoder.next_event()) is not NEED_DATA:
                if event is CLOSED:
                    return
                if isinstance(event, PayloadFollows):
                    if not decoder.readinto_payload(sink):
                        break
                else:
                    assert isinstance(event, Message)
            assert decoder.buffered <= MAX_INCOMPLETE_FRAME_BYTES
            assert chunk, "EOF must give CLOSED or an error"

    def exact() -> None:
        decoder = FrameDecoder(payload_passthrough=True)
        pos = i = 0
        while pos < len(data):
            n = sizes[i % len(sizes)]
            i += 1
            if decoder.payload_remaining:
                n = min(n, decoder.payload_remaining, len(data) - pos)
                decoder.payload_received(n)
            else:
                view = decoder.get_buffer()
                n = min(n, len(view), len(data) - pos)
                view[:n] = data[pos : pos + n]
                decoder.buffer_updated(n)
            pos += n
            while decoder.payload_remaining == 0 and (event := decoder.next_event()) is not NEED_DATA:
                assert isinstance(event, Message)
        decoder.receive_data(b"")
        assert decoder.next_event() is CLOSED

    _expect_only_remote_errors(chunks)
    _expect_only_remote_errors(exact)
