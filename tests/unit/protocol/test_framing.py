"""Frame codec: prefix checks, body decoding, incremental FrameDecoder
(chunks, exact reads, payload pass-through)."""

from __future__ import annotations

import dataclasses
import struct

import msgpack
import pytest

from protocol import (
    CLOSED,
    DATA_STREAM_MAGIC,
    MAGIC,
    MAX_BATCH_RUNS,
    MAX_BLOB_BYTES,
    MAX_FRAME_BYTES,
    MAX_INCOMPLETE_FRAME_BYTES,
    MAX_PAYLOAD_BYTES,
    NEED_DATA,
    PAGE_SIZE,
    PREFIX,
    PREFIX_SIZE,
    BatchFlags,
    Committed,
    ErrorCode,
    FrameDecoder,
    FramePrefix,
    LocalProtocolError,
    Message,
    MsgType,
    PageBatch,
    Payload,
    Ready,
    RemoteProtocolError,
    StateTransfer,
    decode_body,
    encode_frame,
    parse_prefix,
)
from protocol.framing import PayloadFollows

from .conftest import make_examples

ALL_TYPES = list(MsgType)


def batch(runs: tuple[tuple[int, int], ...], flags: BatchFlags = BatchFlags.NONE) -> PageBatch:
    """A PageBatch of ``runs`` (its other fields as in the shared example)."""
    pages = sum(count for _, count in runs)
    return dataclasses.replace(
        make_examples()[MsgType.PAGE_BATCH],
        round=0,
        runs=runs,
        flags=flags,
        payload_len=0 if flags & BatchFlags.ZERO else pages * PAGE_SIZE,
    )


def raw_frame(msg_type: int, body: bytes, payload_len: int = 0, flags: int = 0, magic: bytes = MAGIC) -> bytes:
    return PREFIX.pack(magic, msg_type, flags, len(body), payload_len) + body


def drain(decoder: FrameDecoder) -> list[object]:
    events = []
    while True:
        event = decoder.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if event is CLOSED:
            return events


def decode_all(data: bytes, chunk: int | None = None) -> list[object]:
    """Feed ``data`` (whole or in chunks of ``chunk``), then EOF; merge payloads."""
    decoder = FrameDecoder()
    events: list[object] = []
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for piece in filter(None, pieces):  # b"" would mean EOF
        decoder.receive_data(piece)
        events += drain(decoder)
    decoder.receive_data(b"")
    events += drain(decoder)
    merged: list[object] = []
    for event in events:
        if isinstance(event, Payload) and merged and isinstance(merged[-1], bytes):
            merged[-1] += event.data
        elif isinstance(event, Payload):
            merged.append(bytes(event.data))
        else:
            merged.append(event)
    return merged


def remote_error(code: ErrorCode, data: bytes, eof: bool = False) -> RemoteProtocolError:
    decoder = FrameDecoder()
    decoder.receive_data(data)
    if eof:
        decoder.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        drain(decoder)
    assert info.value.code is code, info.value
    return info.value


# -- sentinels and value types ------------------------------------------------


def test_sentinels():
    assert NEED_DATA is not CLOSED
    assert repr(NEED_DATA) == "NEED_DATA" and repr(CLOSED) == "CLOSED"
    assert type(NEED_DATA) is NEED_DATA  # h11-style self-typed sentinel


def test_payload_repr_hides_bytes():
    assert repr(Payload(b"secret" * 100)) == "Payload(<600 bytes>)"


# -- encoding ----------------------------------------------------------------------


def test_golden_prefix():
    frame = encode_frame(Committed())
    assert frame == b"LMIG" + b"\x00\x0e" + b"\x00\x00" + b"\x00\x00\x00\x01" + b"\x00\x00\x00\x00" + b"\x80"
    assert PREFIX_SIZE == PREFIX.size == 16


def test_page_batch_frame_announces_payload_but_excludes_it():
    msg = batch(((7, 1),))
    frame = encode_frame(msg)
    prefix = parse_prefix(frame[:PREFIX_SIZE])
    assert prefix == FramePrefix(MsgType.PAGE_BATCH, len(frame) - PREFIX_SIZE, PAGE_SIZE)
    assert decode_body(prefix, frame[PREFIX_SIZE:]) == msg


def test_encode_frame_rejects_non_messages():
    with pytest.raises(LocalProtocolError):
        encode_frame({"type": 1})  # type: ignore[arg-type]


def test_largest_state_transfer_fits_a_frame():
    msg = StateTransfer(vcpu_state=b"\1" * (MAX_BLOB_BYTES - 10), device_state=b"\2" * 10)
    frame = encode_frame(msg)
    assert len(frame) - PREFIX_SIZE <= MAX_FRAME_BYTES
    assert decode_all(frame) == [msg, CLOSED]


# -- round trips -------------------------------------------------------------------


@pytest.mark.parametrize("msg_type", ALL_TYPES, ids=lambda t: t.name)
def test_frame_round_trip(msg_type, examples):
    msg = examples[msg_type]
    frame = encode_frame(msg)
    prefix = parse_prefix(frame)
    assert prefix.type is msg_type
    assert decode_body(prefix, memoryview(frame)[PREFIX_SIZE:]) == msg
    payload = bytes(range(256)) * (getattr(msg, "payload_len", 0) // 256)
    expected: list[object] = [msg] + ([payload] if payload else []) + [CLOSED]
    assert decode_all(frame + payload) == expected
    assert decode_all(frame + payload, chunk=1) == expected
    assert decode_all(frame + payload, chunk=1000) == expected


def test_stream_of_all_examples_whole_vs_bytewise(examples, zero_batch):
    stream = b""
    expected: list[object] = []
    for msg in [*examples.values(), zero_batch, examples[MsgType.PAGE_BATCH]]:
        stream += encode_frame(msg)
        expected.append(msg)
        if isinstance(msg, PageBatch) and msg.payload_len:
            payload = bytes([len(expected) % 251]) * msg.payload_len
            stream += payload
            expected.append(payload)
    expected.append(CLOSED)
    assert decode_all(stream) == expected
    assert decode_all(stream, chunk=1) == expected
    assert decode_all(stream, chunk=7) == expected


def test_payload_chunks_never_exceed_remaining():
    msg = batch(((0, 2),))
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(msg) + b"a" * 100)
    assert decoder.next_event() == msg
    assert decoder.payload_remaining == 2 * PAGE_SIZE
    assert decoder.next_event() == Payload(b"a" * 100)
    assert decoder.next_event() is NEED_DATA
    # the rest of the payload plus the next frame in one chunk
    decoder.receive_data(b"b" * (2 * PAGE_SIZE - 100) + encode_frame(Committed()))
    chunk = decoder.next_event()
    assert chunk == Payload(b"b" * (2 * PAGE_SIZE - 100))
    assert decoder.payload_remaining == 0
    assert decoder.next_event() == Committed()
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"")
    assert decoder.next_event() is CLOSED
    assert decoder.next_event() is CLOSED


def test_zero_page_batch_has_no_payload(zero_batch):
    assert decode_all(encode_frame(zero_batch) + encode_frame(Committed())) == [zero_batch, Committed(), CLOSED]


def test_empty_stream_is_closed():
    assert decode_all(b"") == [CLOSED]


# -- prefix errors ---------------------------------------------------------------


def test_bad_magic():
    remote_error(ErrorCode.BAD_MAGIC, raw_frame(MsgType.COMMITTED, b"\x80", magic=b"LMIH"))
    with pytest.raises(RemoteProtocolError) as info:
        parse_prefix(b"XXXX" + bytes(12))
    assert info.value.code is ErrorCode.BAD_MAGIC


def test_http_request_is_bad_magic():
    request = b"GET / HTTP/1.1\r\n\r\n"
    remote_error(ErrorCode.BAD_MAGIC, request)
    with pytest.raises(RemoteProtocolError) as info:
        parse_prefix(request)
    assert info.value.code is ErrorCode.BAD_MAGIC


@pytest.mark.parametrize("head", [b"G", b"GE", b"GET ", b"LMIX", b"\x16\x03\x01"])
def test_bad_magic_fails_fast_before_a_full_prefix(head):
    remote_error(ErrorCode.BAD_MAGIC, head)


def test_data_stream_preamble_is_bad_magic_for_a_frame_decoder():
    """A data stream (v3) sent where frames are expected -- to an old peer, or
    past the endpoint's check -- fails at once instead of being buffered."""
    join = make_examples()[MsgType.JOIN]
    remote_error(ErrorCode.BAD_MAGIC, DATA_STREAM_MAGIC + encode_frame(join))
    remote_error(ErrorCode.BAD_MAGIC, DATA_STREAM_MAGIC[:4])
    with pytest.raises(RemoteProtocolError) as info:
        parse_prefix(DATA_STREAM_MAGIC + bytes(PREFIX_SIZE))
    assert info.value.code is ErrorCode.BAD_MAGIC


def test_join_is_an_ordinary_frame_after_the_preamble():
    """After the 8-byte preamble, a data stream is frames like any other: Join, then batches."""
    examples = make_examples()
    join, batch_msg = examples[MsgType.JOIN], examples[MsgType.PAGE_BATCH]
    payload = b"\x5a" * batch_msg.payload_len
    stream = DATA_STREAM_MAGIC + encode_frame(join) + encode_frame(batch_msg) + payload
    assert stream.startswith(DATA_STREAM_MAGIC)
    decoder = FrameDecoder()
    decoder.receive_data(stream[len(DATA_STREAM_MAGIC):])
    decoder.receive_data(b"")
    assert decoder.next_event() == join
    assert decoder.next_event() == batch_msg
    assert decoder.next_event() == Payload(payload)
    assert decoder.next_event() is CLOSED


@pytest.mark.parametrize("head", [b"L", b"LM", b"LMI", b"LMIG", b"LMIG\x00"])
def test_good_partial_magic_waits(head):
    decoder = FrameDecoder()
    decoder.receive_data(head)
    assert decoder.next_event() is NEED_DATA


@pytest.mark.parametrize("msg_type", [0, max(MsgType) + 1, 0x100, 0xFFFF])
def test_unknown_type(msg_type):
    err = remote_error(ErrorCode.UNKNOWN_TYPE, raw_frame(msg_type, b"\x80"))
    assert str(msg_type) in str(err)


@pytest.mark.parametrize("flags", [1, 0x8000, 0xFFFF])
def test_nonzero_flags(flags):
    remote_error(ErrorCode.MALFORMED, raw_frame(MsgType.COMMITTED, b"\x80", flags=flags))


def test_oversized_body_len_checked_before_buffering():
    prefix = PREFIX.pack(MAGIC, MsgType.STATE_TRANSFER, 0, MAX_FRAME_BYTES + 1, 0)
    remote_error(ErrorCode.TOO_LARGE, prefix)  # only the 16 prefix bytes were fed
    prefix = PREFIX.pack(MAGIC, MsgType.STATE_TRANSFER, 0, 0xFFFFFFFF, 0)
    remote_error(ErrorCode.TOO_LARGE, prefix)


def test_oversized_payload_len_checked_before_buffering():
    prefix = PREFIX.pack(MAGIC, MsgType.PAGE_BATCH, 0, 10, MAX_PAYLOAD_BYTES + 1)
    remote_error(ErrorCode.TOO_LARGE, prefix)


def test_limits_are_inclusive():
    parse_prefix(PREFIX.pack(MAGIC, MsgType.PAGE_BATCH, 0, MAX_FRAME_BYTES, MAX_PAYLOAD_BYTES))


def test_max_body_is_buffered_but_no_more():
    decoder = FrameDecoder()
    decoder.receive_data(PREFIX.pack(MAGIC, MsgType.STATE_TRANSFER, 0, MAX_FRAME_BYTES, 0))
    decoder.receive_data(b"\0" * (MAX_FRAME_BYTES - 1))
    assert decoder.next_event() is NEED_DATA
    assert decoder.buffered == MAX_INCOMPLETE_FRAME_BYTES - 1


@pytest.mark.parametrize("msg_type", [t for t in MsgType if t is not MsgType.PAGE_BATCH], ids=lambda t: t.name)
def test_payload_only_for_page_batch(msg_type):
    remote_error(ErrorCode.MALFORMED, PREFIX.pack(MAGIC, msg_type, 0, 1, 1))


def test_parse_prefix_short_input():
    with pytest.raises(RemoteProtocolError) as info:
        parse_prefix(MAGIC + b"\0\1")
    assert info.value.code is ErrorCode.TRUNCATED


# -- body errors -------------------------------------------------------------------


def test_trailing_bytes_in_body():
    body = msgpack.packb(Committed().to_body()) + b"\x00"
    remote_error(ErrorCode.MALFORMED, raw_frame(MsgType.COMMITTED, body))
    body = msgpack.packb(Ready(migration_id="m", prefault_ms=0, streams=1, token=bytes(16)).to_body()) + b"\xc0"
    remote_error(ErrorCode.MALFORMED, raw_frame(MsgType.READY, body))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x90",  # array, not map
        b"\xa1x",  # str
        b"\xc0",  # nil
        b"\x81\x01\x02",  # int map key
        b"\x81\xc4\x01k\x01",  # bin map key
        b"\x82\xa1a\x01\xa1a\x02",  # duplicate key
        b"\x81\xa1a\xd4\x01\x00",  # ext type
        b"\x81\xa1a\xd6\xff\x00\x00\x00\x00",  # timestamp ext
        b"\x81\xa1a\xa3\xff\xfe\xfd",  # invalid UTF-8
        b"\x91" * 3000 + b"\x80",  # deep nesting
        b"\xdf\xff\xff\xff\xff",  # huge map header
        b"\xdd\xff\xff\xff\xff",  # huge array header
    ],
    ids=repr,
)
def test_bad_msgpack_is_malformed(body):
    remote_error(ErrorCode.MALFORMED, raw_frame(MsgType.COMMITTED, body))
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(FramePrefix(MsgType.COMMITTED, len(body), 0), body)
    assert info.value.code is ErrorCode.MALFORMED


def test_long_string_beyond_max_string_is_malformed():
    body = msgpack.packb({"code": 1, "reason": "x" * 5000})
    remote_error(ErrorCode.MALFORMED, raw_frame(MsgType.ABORT, body))


def test_wrong_field_type_in_frame():
    body = msgpack.packb({"migration_id": "m", "prefault_ms": "12"})
    remote_error(ErrorCode.MALFORMED, raw_frame(MsgType.READY, body))
    body = msgpack.packb({"migration_id": "m", "prefault_ms": True})
    remote_error(ErrorCode.MALFORMED, raw_frame(MsgType.READY, body))
    body = msgpack.packb({"migration_id": "m", "prefault_ms": 1, "x": 0})
    remote_error(ErrorCode.MALFORMED, raw_frame(MsgType.READY, body))
    body = msgpack.packb({"migration_id": "m"})
    remote_error(ErrorCode.MALFORMED, raw_frame(MsgType.READY, body))


def test_body_of_another_type():
    body = msgpack.packb(Ready(migration_id="m", prefault_ms=0, streams=1, token=bytes(16)).to_body())
    remote_error(ErrorCode.MALFORMED, raw_frame(MsgType.RESUME, body))


@pytest.mark.parametrize("prefix_payload", [0, PAGE_SIZE - 1, 2 * PAGE_SIZE])
def test_page_batch_payload_len_mismatch(prefix_payload):
    body = msgpack.packb(batch(((7, 1),)).to_body())
    err = remote_error(ErrorCode.MALFORMED, raw_frame(MsgType.PAGE_BATCH, body, payload_len=prefix_payload))
    assert "payload_len" in str(err)


def test_page_batch_too_many_runs_in_frame():
    base = batch(((0, 1),), BatchFlags.ZERO).to_body()
    body = msgpack.packb({**base, "runs": [0, 1] * (MAX_BATCH_RUNS + 1)})
    err = remote_error(ErrorCode.MALFORMED, raw_frame(MsgType.PAGE_BATCH, body))
    assert "runs" in str(err)
    body = msgpack.packb({**base, "runs": [0, 1] * (MAX_BATCH_RUNS + 100)})
    remote_error(ErrorCode.MALFORMED, raw_frame(MsgType.PAGE_BATCH, body))  # beyond max_array_len


def test_decode_body_length_must_match_prefix():
    body = msgpack.packb({})
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(FramePrefix(MsgType.COMMITTED, 2, 0), body)
    assert info.value.code is ErrorCode.TRUNCATED
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(FramePrefix(MsgType.COMMITTED, 0, 0), body)
    assert info.value.code is ErrorCode.MALFORMED


# -- truncation --------------------------------------------------------------------


def test_truncated_at_every_cut_point(examples):
    batch = examples[MsgType.PAGE_BATCH]
    stream = encode_frame(examples[MsgType.HELLO]) + encode_frame(batch) + b"p" * batch.payload_len
    boundaries = {0, len(encode_frame(examples[MsgType.HELLO])), len(stream)}
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        decoder.receive_data(stream[:cut])
        decoder.receive_data(b"")
        if cut in boundaries:
            assert drain(decoder)[-1] is CLOSED
        else:
            with pytest.raises(RemoteProtocolError) as info:
                drain(decoder)
            assert info.value.code is ErrorCode.TRUNCATED, cut


def test_truncated_mid_payload():
    err = remote_error(ErrorCode.TRUNCATED, encode_frame(batch(((0, 1),))) + b"x" * 10, eof=True)
    assert str(PAGE_SIZE - 10) in str(err)


# -- error state -------------------------------------------------------------------


def test_error_is_sticky():
    decoder = FrameDecoder()
    decoder.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        decoder.next_event()
    assert decoder.buffered == 0  # dropped
    for call in (decoder.next_event, lambda: decoder.receive_data(encode_frame(Committed())), lambda: decoder.receive_data(b"")):
        with pytest.raises(RemoteProtocolError) as info:
            call()
        assert info.value.code is ErrorCode.BAD_MAGIC


def test_data_after_eof_is_local_misuse():
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    decoder.receive_data(b"")  # repeated EOF is fine
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"x")


def test_receive_data_accepts_buffers():
    frame = encode_frame(Committed())
    decoder = FrameDecoder()
    decoder.receive_data(memoryview(frame[:5]))
    decoder.receive_data(bytearray(frame[5:]))
    assert decoder.next_event() == Committed()


def test_events_are_messages():
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(Committed()))
    event = decoder.next_event()
    assert isinstance(event, Message)
    match event:
        case Committed():
            pass
        case _:
            pytest.fail("match on message class failed")


def test_struct_layout_is_big_endian():
    assert PREFIX.format in ("!4sHHII", b"!4sHHII")
    assert struct.calcsize("!4sHHII") == PREFIX_SIZE


# -- exact reads and payload pass-through (the agent's transport) --------------------


def read_exactly(decoder: FrameDecoder, stream: bytes, pos: int, limit: int) -> int:
    """One recv_into as a BufferedProtocol does it: at most ``limit`` bytes into
    the decoder's own view; returns the new stream position."""
    view = decoder.get_buffer()
    n = min(len(view), limit, len(stream) - pos)
    view[:n] = stream[pos : pos + n]
    decoder.buffer_updated(n)
    return pos + n


def test_get_buffer_is_exactly_the_missing_piece():
    msg = batch(((3, 2),))
    frame = encode_frame(msg)
    decoder = FrameDecoder(payload_passthrough=True)
    assert len(decoder.get_buffer()) == PREFIX_SIZE
    pos = read_exactly(decoder, frame, 0, 5)
    assert decoder.next_event() is NEED_DATA
    assert len(decoder.get_buffer()) == PREFIX_SIZE - 5
    pos = read_exactly(decoder, frame, pos, 100)
    assert pos == PREFIX_SIZE  # the prefix view ended at the prefix
    assert decoder.next_event() is NEED_DATA
    assert len(decoder.get_buffer()) == len(frame) - PREFIX_SIZE  # exactly the body
    pos = read_exactly(decoder, frame, pos, 1 << 20)
    assert pos == len(frame)
    assert decoder.next_event() == msg
    assert decoder.next_event() == PayloadFollows(2 * PAGE_SIZE)
    with pytest.raises(LocalProtocolError):
        decoder.get_buffer()  # the payload is the caller's
    decoder.payload_received(PAGE_SIZE)
    assert decoder.next_event() == PayloadFollows(PAGE_SIZE)
    decoder.payload_received(PAGE_SIZE)
    assert decoder.payload_remaining == 0
    assert decoder.next_event() is NEED_DATA
    assert len(decoder.get_buffer()) == PREFIX_SIZE
    decoder.receive_data(b"")
    assert decoder.next_event() is CLOSED


def test_exact_reads_of_empty_and_max_bodies():
    empty = raw_frame(MsgType.COMMITTED, b"")  # body_len 0: decoded (and refused) with no read
    decoder = FrameDecoder(payload_passthrough=True)
    read_exactly(decoder, empty, 0, 64)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.code is ErrorCode.MALFORMED
    decoder = FrameDecoder(payload_passthrough=True)
    read_exactly(decoder, PREFIX.pack(MAGIC, MsgType.STATE_TRANSFER, 0, MAX_FRAME_BYTES, 0), 0, 64)
    assert decoder.next_event() is NEED_DATA
    assert len(decoder.get_buffer()) == MAX_FRAME_BYTES


@pytest.mark.parametrize(
    "prefix",
    [
        PREFIX.pack(MAGIC, MsgType.STATE_TRANSFER, 0, MAX_FRAME_BYTES + 1, 0),
        PREFIX.pack(MAGIC, MsgType.PAGE_BATCH, 0, 10, MAX_PAYLOAD_BYTES + 1),
    ],
)
def test_exact_reads_check_limits_before_the_body_buffer(prefix):
    decoder = FrameDecoder(payload_passthrough=True)
    read_exactly(decoder, prefix, 0, 64)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.code is ErrorCode.TOO_LARGE
    assert decoder.buffered == 0
    with pytest.raises(RemoteProtocolError):
        decoder.get_buffer()  # sticky


@pytest.mark.parametrize("head", [b"G", b"GET ", b"\x16\x03\x01"])
def test_exact_reads_fail_fast_on_bad_magic(head):
    decoder = FrameDecoder(payload_passthrough=True)
    read_exactly(decoder, head, 0, 64)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.code is ErrorCode.BAD_MAGIC


def test_passthrough_takes_buffered_payload_then_the_stream():
    msg = batch(((0, 1), (9, 2)))
    payload = bytes(range(256)) * (msg.payload_len // 256)
    decoder = FrameDecoder(payload_passthrough=True)
    decoder.receive_data(encode_frame(msg) + payload[:100])
    assert decoder.next_event() == msg
    assert decoder.next_event() == PayloadFollows(msg.payload_len)
    target = bytearray(msg.payload_len)
    assert decoder.readinto_payload(memoryview(target)[:40]) == 40
    with pytest.raises(LocalProtocolError):
        decoder.payload_received(1)  # 60 buffered bytes come first
    assert decoder.readinto_payload(memoryview(target)[40:]) == 60
    assert decoder.readinto_payload(memoryview(target)[100:]) == 0  # the rest is in the stream
    assert decoder.buffered == 0
    assert decoder.next_event() == PayloadFollows(msg.payload_len - 100)
    target[100:] = payload[100:]  # as a recv_into the caller's buffer would
    decoder.payload_received(msg.payload_len - 100)
    assert bytes(target) == payload
    decoder.receive_data(encode_frame(Committed()))
    assert decoder.next_event() == Committed()


def test_passthrough_payload_bytes_never_become_events():
    msg = batch(((0, 1),))
    decoder = FrameDecoder(payload_passthrough=True)
    decoder.receive_data(encode_frame(msg) + b"p" * PAGE_SIZE + encode_frame(Committed()))
    assert decoder.next_event() == msg
    for _ in range(3):  # repeated until taken; never a Payload, never the next frame
        assert decoder.next_event() == PayloadFollows(PAGE_SIZE)
    assert decoder.readinto_payload(bytearray(PAGE_SIZE)) == PAGE_SIZE
    assert decoder.next_event() == Committed()


def test_passthrough_eof_mid_payload_is_truncated():
    decoder = FrameDecoder(payload_passthrough=True)
    decoder.receive_data(encode_frame(batch(((0, 1),))))
    decoder.next_event()
    decoder.payload_received(10)
    decoder.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.code is ErrorCode.TRUNCATED
    assert str(PAGE_SIZE - 10) in str(info.value)


def test_exact_read_misuse_is_local():
    decoder = FrameDecoder(payload_passthrough=True)
    with pytest.raises(LocalProtocolError):
        decoder.buffer_updated(PREFIX_SIZE + 1)  # more than the view holds
    with pytest.raises(LocalProtocolError):
        decoder.payload_received(1)  # no payload announced
    decoder.receive_data(b"LM")
    with pytest.raises(LocalProtocolError):
        decoder.get_buffer()  # chunks and exact reads are not mixed
    decoder = FrameDecoder(payload_passthrough=True)
    read_exactly(decoder, encode_frame(Committed()), 0, PREFIX_SIZE)
    with pytest.raises(LocalProtocolError):
        decoder.get_buffer()  # a complete prefix waits for next_event
    decoder = FrameDecoder()  # payloads as events
    decoder.receive_data(encode_frame(batch(((0, 1),))))
    decoder.next_event()
    for call in (lambda: decoder.payload_received(1), lambda: decoder.readinto_payload(bytearray(8))):
        with pytest.raises(LocalProtocolError):
            call()
