"""Messages: exhaustiveness, round trips, validation, strict from_body."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from protocol import (
    CLOSED,
    DATA_STREAM_MAGIC,
    MAGIC,
    MAX_BATCH_PAGES,
    MAX_BATCH_RUNS,
    MAX_BLOB_BYTES,
    MAX_FEATURES,
    MAX_SECTIONS,
    MAX_STREAMS,
    MAX_STRING,
    NONCE_BYTES,
    PAGE_SIZE,
    PREFIX,
    PREFIX_SIZE,
    QUERY_STATES,
    REGISTRY,
    U64_MAX,
    VERIFY_MODES,
    Abort,
    Auth,
    BatchFlags,
    Committed,
    Digests,
    ErrorCode,
    FrameDecoder,
    Hello,
    Join,
    LocalProtocolError,
    Message,
    MsgType,
    PageBatch,
    Prepare,
    QueryResult,
    Ready,
    Reject,
    RemoteProtocolError,
    SectionState,
    StateTransfer,
    Welcome,
    encode_frame,
    parse_prefix,
)
from protocol import wire
import protocol

ALL_TYPES = list(MsgType)


# -- exhaustiveness ------------------------------------------------------------


def test_every_msgtype_has_a_registered_class():
    assert set(REGISTRY) == set(MsgType)
    for msg_type, cls in REGISTRY.items():
        assert cls.TYPE is msg_type
        assert issubclass(cls, Message)


def test_example_table_is_exhaustive(examples):
    assert set(examples) == set(MsgType)
    for msg_type, msg in examples.items():
        assert type(msg) is REGISTRY[msg_type]


@pytest.mark.parametrize("enum_cls", [MsgType, ErrorCode])
def test_enum_values_are_distinct_ints(enum_cls):
    values = [int(member) for member in enum_cls.__members__.values()]
    assert len(values) == len(set(values)), "an alias hides a duplicate value"
    assert all(type(v) is int and 1 <= v <= 0xFFFF for v in values)


def test_spec_numbering():
    assert MsgType.HELLO == 1 and MsgType.ABORT == 17 and MsgType.ROUND_ACK == 18
    assert MsgType.SECTION_STATE == 19
    assert MsgType.JOIN == 20  # v3: first frame of a data stream
    assert [int(t) for t in MsgType] == list(range(1, 21))  # dense: no number reused or skipped
    assert ErrorCode.MALFORMED == 1 and ErrorCode.INCOMPATIBLE == 17
    assert len(MsgType) == 20 and len(ErrorCode) == 17
    assert BatchFlags.NONE == 0 and BatchFlags.ZERO == 1


def test_limits():
    assert wire.PAGE_SIZE == 4096
    assert wire.MAGIC == b"LMIG"
    assert wire.MAX_FRAME_BYTES == 4 * 1024 * 1024
    assert wire.MAX_PAYLOAD_BYTES == 64 * 1024 * 1024
    assert wire.MAX_BATCH_PAGES * PAGE_SIZE <= wire.MAX_PAYLOAD_BYTES
    assert wire.MIN_PROTOCOL_VERSION <= wire.PROTOCOL_VERSION


def test_v3_constants():
    assert wire.PROTOCOL_VERSION == wire.MIN_PROTOCOL_VERSION == 3  # v1 and v2 are no longer spoken
    assert MAX_SECTIONS == 64
    assert QUERY_STATES == {"running", "discarded", "in-progress", "unknown"}
    assert VERIFY_MODES == {"incremental", "full"}
    assert wire.MAX_STREAMS == MAX_STREAMS == 8
    assert wire.NONCE_BYTES == NONCE_BYTES == 16  # also the length of a Ready/Join token


def test_data_stream_magic():
    assert wire.DATA_STREAM_MAGIC == DATA_STREAM_MAGIC == b"LMDATA3\n"
    assert type(DATA_STREAM_MAGIC) is bytes
    # The endpoint tells the two kinds of connection apart by their first
    # bytes: a data stream's preamble must never start like a frame.
    assert not DATA_STREAM_MAGIC.startswith(MAGIC) and DATA_STREAM_MAGIC[: len(MAGIC)] != MAGIC


@pytest.mark.parametrize("name", ["SectionState", "MAX_SECTIONS", "QUERY_STATES", "VERIFY_MODES", "Join"])
def test_v2_v3_names_are_exported(name):
    assert name in protocol.__all__
    assert getattr(protocol, name) is getattr(protocol.messages, name)


@pytest.mark.parametrize("name", ["MAX_STREAMS", "DATA_STREAM_MAGIC"])
def test_v3_wire_names_are_exported(name):
    assert name in protocol.__all__ and name in wire.__all__
    assert getattr(protocol, name) is getattr(wire, name)


def test_all_exports_resolve():
    missing = [name for name in protocol.__all__ if not hasattr(protocol, name)]
    assert not missing
    assert len(set(protocol.__all__)) == len(protocol.__all__)


# -- dataclass shape -----------------------------------------------------------


@pytest.mark.parametrize("msg_type", ALL_TYPES, ids=lambda t: t.name)
def test_frozen_slotted_kw_only(msg_type, examples):
    msg = examples[msg_type]
    cls = type(msg)
    params = dataclasses.fields(cls)
    assert all(f.kw_only for f in params if f.init)
    assert not hasattr(msg, "__dict__")
    for f in params:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(msg, f.name, getattr(msg, f.name))
    if any(f.init for f in params):
        with pytest.raises(TypeError):
            cls(*[getattr(msg, f.name) for f in params if f.init])


# -- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("msg_type", ALL_TYPES, ids=lambda t: t.name)
def test_body_round_trip(msg_type, examples):
    msg = examples[msg_type]
    body = msg.to_body()
    assert isinstance(body, dict) and all(isinstance(k, str) for k in body)
    again = type(msg).from_body(body)
    assert again == msg
    assert type(again) is type(msg)


def test_tuples_come_back_as_tuples(examples):
    hello = examples[MsgType.HELLO]
    body = hello.to_body()
    body["features"] = list(body["features"])  # what msgpack hands us
    again = Hello.from_body(body)
    assert type(again.features) is tuple and again == hello


def test_page_batch_runs_are_flat_on_the_wire():
    batch = PageBatch(section=5, round=1, runs=((3, 2), (9, 1)), flags=BatchFlags.NONE, payload_len=3 * PAGE_SIZE)
    assert batch.to_body() == {
        "section": 5, "round": 1, "runs": [3, 2, 9, 1], "flags": 0, "payload_len": 3 * PAGE_SIZE
    }
    assert batch.pages == 3
    assert PageBatch.from_body(batch.to_body()).runs == ((3, 2), (9, 1))


def test_enums_are_normalised_and_sent_as_ints():
    reject = Reject(code=8, reason="x")
    assert reject.code is ErrorCode.AUTH_FAILED
    assert type(reject.to_body()["code"]) is int
    batch = PageBatch(section=0, round=0, runs=((0, 1),), flags=1, payload_len=0)
    assert batch.flags is BatchFlags.ZERO


# -- constructor validation (LocalProtocolError) --------------------------------

HELLO = dict(
    version_min=1, version_max=1, agent="a", features=(), max_live_migrations=1, nonce=b"n" * 16
)


@pytest.mark.parametrize(
    "changes",
    [
        {"nonce": b"n" * 15},
        {"nonce": b"n" * 17},
        {"nonce": bytearray(16)},
        {"version_min": 2, "version_max": 1},
        {"version_min": -1},
        {"version_max": U64_MAX + 1},
        {"version_min": True},
        {"version_min": 1.0},
        {"max_live_migrations": 0},
        {"agent": b"a"},
        {"agent": "x" * (MAX_STRING + 1)},
        {"agent": "é" * (MAX_STRING // 2 + 1)},  # chars fit, UTF-8 bytes do not
        {"agent": "\ud800"},  # lone surrogate: not encodable
        {"features": ["zero-pages"]},
        {"features": ("zero-pages", 1)},
        {"features": ("f",) * (MAX_FEATURES + 1)},
        {"features": ("x" * (MAX_STRING + 1),)},
    ],
    ids=repr,
)
def test_hello_rejects(changes):
    with pytest.raises(LocalProtocolError):
        Hello(**{**HELLO, **changes})


def test_string_limit_is_inclusive():
    Hello(**{**HELLO, "agent": "x" * MAX_STRING})
    Hello(**{**HELLO, "agent": "é" * (MAX_STRING // 2)})
    Hello(**{**HELLO, "features": ("f",) * MAX_FEATURES})


WELCOME = dict(
    version=1, agent="d", features=(), max_live_migrations=1, slots=1, nonce=b"s" * 16, proof=b"", slots_free=1, memory_free_bytes=0, status="accepting"
)


@pytest.mark.parametrize("proof", [b"", b"p" * 32])
def test_welcome_proof_lengths_ok(proof):
    assert Welcome(**{**WELCOME, "proof": proof}).proof == proof


@pytest.mark.parametrize("changes", [{"proof": b"p" * 31}, {"proof": b"p" * 33}, {"slots": 0}, {"nonce": b""},
                                     {"status": "busy"}, {"memory_free_bytes": -1}])
def test_welcome_rejects(changes):
    with pytest.raises(LocalProtocolError):
        Welcome(**{**WELCOME, **changes})


@pytest.mark.parametrize("proof", [b"", b"p" * 31, b"p" * 33, "p" * 32])
def test_auth_proof_length(proof):
    with pytest.raises(LocalProtocolError):
        Auth(proof=proof)


PREPARE = dict(
    migration_id="m",
    vm="vm",
    memory_bytes=PAGE_SIZE,
    workload="",
    features=(),
    source="s",
    sections=("ram",),
    setup=msgpack.packb([{}]),
    verify_mode="full",
    streams=1,
)


def test_prepare_v2_fields_on_the_wire():
    prepare = Prepare(**{**PREPARE, "sections": ("ram", "disk0"), "setup": b"\x92\x80\x80"})
    body = prepare.to_body()
    assert "populated" not in body
    assert body["sections"] == ("ram", "disk0") and body["setup"] == b"\x92\x80\x80"
    assert body["verify_mode"] == "full"
    wire_body = {**body, "sections": list(body["sections"])}  # what msgpack hands us
    again = Prepare.from_body(wire_body)
    assert again == prepare and type(again.sections) is tuple


def test_prepare_populated_is_gone():
    with pytest.raises(TypeError):
        Prepare(**{**PREPARE, "populated": ()})
    err = _malformed(Prepare, {**Prepare(**PREPARE).to_body(), "populated": []})
    assert "populated" in str(err)
    v1_body = {k: v for k, v in Prepare(**PREPARE).to_body().items() if k not in {"sections", "setup", "verify_mode"}}
    err = _malformed(Prepare, {**v1_body, "populated": [0, 1]})
    assert "sections" in str(err) and "verify_mode" in str(err)


@pytest.mark.parametrize("mode", sorted(VERIFY_MODES))
def test_prepare_verify_modes_ok(mode):
    assert Prepare(**{**PREPARE, "verify_mode": mode}).verify_mode == mode


@pytest.mark.parametrize(
    "sections",
    [("ram",), ("ram", "disk0", "devices"), tuple(f"s{i}" for i in range(MAX_SECTIONS))],
    ids=["one", "three", "max"],
)
def test_prepare_sections_ok(sections):
    assert Prepare(**{**PREPARE, "sections": sections}).sections == sections


@pytest.mark.parametrize("setup", [b"", b"\xc1", b"\x00" * 1000], ids=["empty", "not-msgpack", "long"])
def test_prepare_setup_is_opaque(setup):
    """The protocol does not parse the setup blob: each section validates its own."""
    assert Prepare(**{**PREPARE, "setup": setup}).setup == setup


@pytest.mark.parametrize(
    "changes",
    [
        {"sections": ()},
        {"sections": ("ram", "ram")},
        {"sections": ("ram", "disk0", "ram")},
        {"sections": tuple(f"s{i}" for i in range(MAX_SECTIONS + 1))},
        {"sections": ["ram"]},
        {"sections": "ram"},
        {"sections": ("ram", 1)},
        {"sections": (b"ram",)},
        {"setup": "[{}]"},
        {"setup": bytearray(b"\x91\x80")},
        {"setup": None},
        {"verify_mode": "none"},
        {"verify_mode": ""},
        {"verify_mode": "Full"},
        {"verify_mode": "full "},
        {"verify_mode": b"full"},
        {"verify_mode": None},
    ],
    ids=repr,
)
def test_prepare_v2_fields_rejected(changes):
    with pytest.raises(LocalProtocolError) as info:
        Prepare(**{**PREPARE, **changes})
    assert info.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"sections": []}, ("sections",)),
        ({"sections": ["ram", "ram"]}, ("sections", "distinct")),
        ({"verify_mode": "sometimes"}, ("verify_mode", "sometimes")),
    ],
    ids=repr,
)
def test_prepare_v2_fields_malformed_on_the_wire(changes, words):
    err = _malformed(Prepare, {**Prepare(**PREPARE).to_body(), **changes})
    assert all(word in str(err) for word in words), str(err)


@pytest.mark.parametrize(
    "changes",
    [
        {"migration_id": ""},
        {"migration_id": "m" * 65},
        {"vm": ""},
        {"vm": "v" * 65},
        {"memory_bytes": 0},
        {"memory_bytes": PAGE_SIZE + 1},
        {"memory_bytes": -PAGE_SIZE},
    ],
    ids=repr,
)
def test_prepare_rejects(changes):
    with pytest.raises(LocalProtocolError):
        Prepare(**{**PREPARE, **changes})


def test_prepare_id_limits_inclusive():
    Prepare(**{**PREPARE, "migration_id": "m" * 64, "vm": "v" * 64})


@pytest.mark.parametrize("mid", ["", "x" * 65])
def test_migration_id_checked_everywhere(mid):
    with pytest.raises(LocalProtocolError):
        Ready(migration_id=mid, prefault_ms=0, streams=1, token=bytes(16))


@pytest.mark.parametrize(
    "runs, flags, payload_len",
    [
        ((), BatchFlags.NONE, 0),
        (((0, 0),), BatchFlags.NONE, 0),
        (((-1, 1),), BatchFlags.NONE, PAGE_SIZE),
        (((0, 1),), BatchFlags.NONE, 0),
        (((0, 1),), BatchFlags.NONE, 2 * PAGE_SIZE),
        (((0, 1),), BatchFlags.ZERO, PAGE_SIZE),
        ([(0, 1)], BatchFlags.NONE, PAGE_SIZE),
        (([0, 1],), BatchFlags.NONE, PAGE_SIZE),
        (((0, 1, 2),), BatchFlags.NONE, PAGE_SIZE),
        (((0,),), BatchFlags.NONE, PAGE_SIZE),
        (((0, 1), (5,)), BatchFlags.NONE, 2 * PAGE_SIZE),
        (((True, 1),), BatchFlags.NONE, PAGE_SIZE),
        (((0, True),), BatchFlags.NONE, PAGE_SIZE),
        (((0, 1.0),), BatchFlags.NONE, PAGE_SIZE),
        (((0, MAX_BATCH_PAGES + 1),), BatchFlags.ZERO, 0),
        (((0, 1),) * (MAX_BATCH_RUNS + 1), BatchFlags.ZERO, 0),
        (((U64_MAX, 1),), BatchFlags.ZERO, 0),
        (((0, 1),), 2, 0),
        (((0, 1),), -1, 0),
        (((0, 1),), True, 0),
        ((0, 1), BatchFlags.NONE, PAGE_SIZE),
    ],
    ids=repr,
)
def test_page_batch_rejects(runs, flags, payload_len):
    with pytest.raises(LocalProtocolError):
        PageBatch(section=0, round=0, runs=runs, flags=flags, payload_len=payload_len)


@pytest.mark.parametrize("section", [0, 1, MAX_SECTIONS - 1])
def test_page_batch_section_ok(section):
    assert PageBatch(section=section, round=0, runs=((0, 1),), flags=BatchFlags.ZERO, payload_len=0).section == section


@pytest.mark.parametrize("section", [MAX_SECTIONS, 255, U64_MAX, -1, True, 1.0, "0", None], ids=repr)
def test_page_batch_section_rejects(section):
    with pytest.raises(LocalProtocolError) as info:
        PageBatch(section=section, round=0, runs=((0, 1),), flags=BatchFlags.ZERO, payload_len=0)
    assert info.value.code is ErrorCode.MALFORMED
    assert "section" in str(info.value)


def test_page_batch_section_out_of_range_on_the_wire():
    body = PageBatch(section=0, round=0, runs=((0, 1),), flags=BatchFlags.ZERO, payload_len=0).to_body()
    err = _malformed(PageBatch, {**body, "section": MAX_SECTIONS})
    assert "section" in str(err) and str(MAX_SECTIONS) in str(err)
    body.pop("section")
    assert "section" in str(_malformed(PageBatch, body))  # a v1 body


def test_page_batch_limits_inclusive():
    full = PageBatch(
        section=MAX_SECTIONS - 1,
        round=0,
        runs=tuple((i * 8, 4) for i in range(MAX_BATCH_RUNS)),
        flags=BatchFlags.NONE,
        payload_len=MAX_BATCH_PAGES * PAGE_SIZE,
    )
    assert full.pages == MAX_BATCH_PAGES
    zero = PageBatch(section=0, round=0, runs=((U64_MAX - 1, 1),), flags=BatchFlags.ZERO, payload_len=0)
    assert zero.pages == 1


def test_page_batch_pages_not_compared():
    a = PageBatch(section=3, round=0, runs=((0, 2),), flags=BatchFlags.ZERO, payload_len=0)
    assert "_pages" not in repr(a)
    assert a == PageBatch.from_body(a.to_body())
    assert hash(a) == hash(PageBatch.from_body(a.to_body()))


def test_state_transfer_total_limit():
    half = MAX_BLOB_BYTES // 2
    StateTransfer(vcpu_state=b"\0" * half, device_state=b"\0" * (MAX_BLOB_BYTES - half))
    with pytest.raises(LocalProtocolError):
        StateTransfer(vcpu_state=b"\0" * half, device_state=b"\0" * (MAX_BLOB_BYTES - half + 1))


@pytest.mark.parametrize(
    "section, digests, chunk_pages",
    [
        (0, b"\0" * 15, 1),
        (0, b"\0" * 17, 1),
        (0, b"", 0),
        (MAX_SECTIONS, b"\0" * 16, 1),
        (MAX_SECTIONS + 1, b"", 1),
        (-1, b"", 1),
        (True, b"", 1),
        ("1", b"", 1),
    ],
    ids=repr,
)
def test_digests_rejects(section, digests, chunk_pages):
    with pytest.raises(LocalProtocolError) as info:
        Digests(section=section, chunk_pages=chunk_pages, digests=digests)
    assert info.value.code is ErrorCode.MALFORMED


def test_digests_count():
    assert Digests(section=0, chunk_pages=1, digests=b"\0" * 48).count == 3
    assert Digests(section=MAX_SECTIONS - 1, chunk_pages=1, digests=b"").count == 0


def test_digests_section_on_the_wire():
    digests = Digests(section=7, chunk_pages=16, digests=b"\x01" * 32)
    assert digests.to_body() == {"section": 7, "chunk_pages": 16, "digests": b"\x01" * 32}
    assert Digests.from_body(digests.to_body()) == digests
    assert Digests.from_body(digests.to_body()) != Digests(section=8, chunk_pages=16, digests=b"\x01" * 32)
    err = _malformed(Digests, {**digests.to_body(), "section": MAX_SECTIONS})
    assert "section" in str(err)


# -- SectionState (new in v2) ------------------------------------------------------


@pytest.mark.parametrize(
    "section, data",
    [(0, b""), (2, b"\x00regs\xff"), (MAX_SECTIONS - 1, b"\xaa" * 4096), (0, b"\0" * MAX_BLOB_BYTES)],
    ids=["empty", "small", "last-section", "max-blob"],
)
def test_section_state_round_trip(section, data):
    msg = SectionState(section=section, data=data)
    assert msg.TYPE is MsgType.SECTION_STATE and REGISTRY[MsgType.SECTION_STATE] is SectionState
    assert msg.to_body() == {"section": section, "data": data}
    assert SectionState.from_body(msg.to_body()) == msg
    # and through a real frame: the data travels in the msgpack body, no payload
    frame = encode_frame(msg)
    prefix = parse_prefix(frame[:PREFIX_SIZE])
    assert prefix.type is MsgType.SECTION_STATE and prefix.payload_len == 0
    decoder = FrameDecoder()
    decoder.receive_data(frame)
    decoder.receive_data(b"")
    assert decoder.next_event() == msg
    assert decoder.next_event() is CLOSED


@pytest.mark.parametrize(
    "section, data",
    [
        (MAX_SECTIONS, b""),
        (MAX_SECTIONS + 1, b"x"),
        (255, b"x"),
        (-1, b"x"),
        (U64_MAX + 1, b"x"),
        (True, b"x"),
        (0.0, b"x"),
        ("0", b"x"),
        (0, "regs"),
        (0, bytearray(b"regs")),
        (0, memoryview(b"regs")),
        (0, [1, 2]),
        (0, None),
        (0, 7),
        (0, b"\0" * (MAX_BLOB_BYTES + 1)),
    ],
    ids=lambda v: repr(v)[:24],
)
def test_section_state_rejects(section, data):
    with pytest.raises(LocalProtocolError) as info:
        SectionState(section=section, data=data)
    assert info.value.code is ErrorCode.MALFORMED
    assert "SectionState" in str(info.value)


@pytest.mark.parametrize(
    "body, word",
    [
        ({"section": MAX_SECTIONS, "data": b""}, "section"),
        ({"section": 0, "data": "regs"}, "data"),
        ({"section": 0}, "data"),
        ({"data": b""}, "section"),
        ({"section": 0, "data": b"", "vcpu": b""}, "vcpu"),
    ],
    ids=repr,
)
def test_section_state_malformed_on_the_wire(body, word):
    assert word in str(_malformed(SectionState, body))


# -- QueryResult states (closed set since v2) --------------------------------------


@pytest.mark.parametrize("state", sorted(QUERY_STATES))
def test_query_result_states_ok(state):
    msg = QueryResult(migration_id="m", state=state)
    assert QueryResult.from_body(msg.to_body()) == msg


@pytest.mark.parametrize("state", ["completed", "verifying", "", "Running", "running ", "UNKNOWN"])
def test_query_result_state_outside_the_set(state):
    with pytest.raises(LocalProtocolError) as info:
        QueryResult(migration_id="m", state=state)
    assert info.value.code is ErrorCode.MALFORMED
    err = _malformed(QueryResult, {"migration_id": "m", "state": state})
    assert "state" in str(err)


def _raw_frame(msg_type: MsgType, body: dict) -> bytes:
    packed = msgpack.packb(body)
    return PREFIX.pack(MAGIC, msg_type, 0, len(packed), 0) + packed


@pytest.mark.parametrize(
    "msg_type, body",
    [
        (MsgType.QUERY_RESULT, {"migration_id": "m", "state": "completed"}),
        (MsgType.SECTION_STATE, {"section": MAX_SECTIONS, "data": b""}),
        (MsgType.DIGESTS, {"section": MAX_SECTIONS, "chunk_pages": 1, "digests": b""}),
    ],
    ids=lambda v: getattr(v, "name", "body"),
)
def test_invalid_v2_values_are_malformed_when_decoding_a_frame(msg_type, body):
    """The whole input path (FrameDecoder), not only from_body."""
    good = {**body, "state": "unknown"} if msg_type is MsgType.QUERY_RESULT else {**body, "section": 0}
    decoder = FrameDecoder()
    decoder.receive_data(_raw_frame(msg_type, good))
    assert type(decoder.next_event()) is REGISTRY[msg_type]  # the frame itself is well formed
    decoder = FrameDecoder()
    decoder.receive_data(_raw_frame(msg_type, body))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize("code", [0, 18, -1, True, "MALFORMED", None])
def test_error_code_rejects(code):
    with pytest.raises(LocalProtocolError):
        Abort(code=code, reason="x")


def test_validation_error_code():
    with pytest.raises(LocalProtocolError) as info:
        Auth(proof=b"")
    assert info.value.code is ErrorCode.MALFORMED  # an invalid message, not a bad order
    assert "Auth" in str(info.value)


# -- strict from_body (RemoteProtocolError MALFORMED) ----------------------------


def _malformed(cls, body):
    with pytest.raises(RemoteProtocolError) as info:
        cls.from_body(body)
    assert info.value.code is ErrorCode.MALFORMED
    return info.value


@pytest.mark.parametrize("msg_type", ALL_TYPES, ids=lambda t: t.name)
def test_unknown_key(msg_type, examples):
    msg = examples[msg_type]
    err = _malformed(type(msg), {**msg.to_body(), "extra": 1})
    assert "extra" in str(err)


@pytest.mark.parametrize("msg_type", ALL_TYPES, ids=lambda t: t.name)
def test_missing_key(msg_type, examples):
    msg = examples[msg_type]
    body = msg.to_body()
    for key in body:
        partial = dict(body)
        del partial[key]
        err = _malformed(type(msg), partial)
        assert key in str(err)


@pytest.mark.parametrize("msg_type", ALL_TYPES, ids=lambda t: t.name)
def test_wrong_types(msg_type, examples):
    msg = examples[msg_type]
    body = msg.to_body()
    for key, value in body.items():
        for wrong in (None, 1.5, {"a": 1}, True, False):
            _malformed(type(msg), {**body, key: wrong})
        if isinstance(value, int):
            _malformed(type(msg), {**body, key: str(value)})
            _malformed(type(msg), {**body, key: -1})
        elif isinstance(value, str):
            _malformed(type(msg), {**body, key: value.encode()})
        elif isinstance(value, bytes):
            _malformed(type(msg), {**body, key: value.decode("latin-1")})
        elif isinstance(value, (list, tuple)):
            _malformed(type(msg), {**body, key: "not a list"})


@pytest.mark.parametrize("body", [None, [], "x", 1, b"x"], ids=repr)
def test_body_not_a_dict(body):
    _malformed(Committed, body)


def test_bool_is_not_an_int():
    body = Ready(migration_id="m", prefault_ms=1, streams=1, token=bytes(16)).to_body()
    body["prefault_ms"] = True
    _malformed(Ready, body)
    body = PageBatch(section=0, round=0, runs=((0, 1),), flags=BatchFlags.ZERO, payload_len=0).to_body()
    body["runs"] = [0, True]
    _malformed(PageBatch, body)


def test_bytes_keys_are_unknown():
    err = _malformed(Ready, {b"migration_id": "m", "prefault_ms": 1, "streams": 1, "token": bytes(16)})
    assert "unknown keys b'migration_id'" in str(err) and "missing keys migration_id" in str(err)


@pytest.mark.parametrize("runs", [[], [1], [0, 1, 2], [[0, 1]], [0, -1], "0,1"], ids=repr)
def test_page_batch_bad_wire_runs(runs):
    err = _malformed(PageBatch, {"section": 0, "round": 0, "runs": runs, "flags": 1, "payload_len": 0})
    assert "runs" in str(err)


def test_page_batch_too_many_runs_on_wire():
    runs = [0, 1] * (MAX_BATCH_RUNS + 1)
    err = _malformed(PageBatch, {"section": 0, "round": 0, "runs": runs, "flags": 1, "payload_len": 0})
    assert str(MAX_BATCH_RUNS) in str(err)


def test_unknown_error_code_on_wire():
    _malformed(Abort, {"code": 99, "reason": "x"})


# -- v3: data streams (Prepare.streams, Ready.streams/token, Join) --------------------

TOKEN = bytes(range(16))
READY = dict(migration_id="m", prefault_ms=0, streams=1, token=TOKEN)
JOIN = dict(migration_id="m", stream=0, token=TOKEN)
#: int values that are not a streams count / stream index whatever the range
NOT_INTS = [True, False, 1.0, "1", None, b"\x01"]
#: bytes values that are not a 16-byte token
BAD_TOKENS = [b"", TOKEN[:15], TOKEN + b"\x00", b"\x00" * 32, bytearray(TOKEN), memoryview(TOKEN),
              TOKEN.decode("latin-1"), None, list(TOKEN)]


@pytest.mark.parametrize("streams", range(1, MAX_STREAMS + 1))
def test_prepare_streams_ok(streams):
    prepare = Prepare(**{**PREPARE, "streams": streams})
    assert prepare.streams == streams
    assert prepare.to_body()["streams"] == streams
    assert Prepare.from_body(prepare.to_body()) == prepare


@pytest.mark.parametrize("streams", [0, MAX_STREAMS + 1, 64, -1, U64_MAX, U64_MAX + 1, *NOT_INTS], ids=repr)
def test_prepare_streams_rejected(streams):
    with pytest.raises(LocalProtocolError) as info:
        Prepare(**{**PREPARE, "streams": streams})
    assert info.value.code is ErrorCode.MALFORMED
    assert "streams" in str(info.value)


def test_prepare_streams_on_the_wire():
    body = Prepare(**PREPARE).to_body()
    assert "streams" in str(_malformed(Prepare, {**body, "streams": 0}))
    assert str(MAX_STREAMS) in str(_malformed(Prepare, {**body, "streams": MAX_STREAMS + 1}))
    v2_body = {k: v for k, v in body.items() if k != "streams"}  # what a v2 source sends
    assert "missing keys streams" in str(_malformed(Prepare, v2_body))


@pytest.mark.parametrize("streams", range(1, MAX_STREAMS + 1))
def test_ready_streams_ok(streams):
    ready = Ready(**{**READY, "streams": streams})
    assert ready.streams == streams and ready.token == TOKEN


def test_ready_round_trip():
    ready = Ready(migration_id="mig-7", prefault_ms=12, streams=MAX_STREAMS, token=b"\xff" * NONCE_BYTES)
    body = ready.to_body()
    assert body == {"migration_id": "mig-7", "prefault_ms": 12, "streams": MAX_STREAMS, "token": b"\xff" * 16}
    assert Ready.from_body(body) == ready
    frame = encode_frame(ready)
    assert parse_prefix(frame[:PREFIX_SIZE]).payload_len == 0  # the token is in the body
    decoder = FrameDecoder()
    decoder.receive_data(frame)
    decoder.receive_data(b"")
    assert decoder.next_event() == ready and decoder.next_event() is CLOSED
    # a different token is a different Ready
    assert ready != Ready(migration_id="mig-7", prefault_ms=12, streams=MAX_STREAMS, token=b"\xfe" * 16)


@pytest.mark.parametrize("streams", [0, MAX_STREAMS + 1, -1, U64_MAX + 1, *NOT_INTS], ids=repr)
def test_ready_streams_rejected(streams):
    with pytest.raises(LocalProtocolError) as info:
        Ready(**{**READY, "streams": streams})
    assert info.value.code is ErrorCode.MALFORMED
    assert "streams" in str(info.value) and "Ready" in str(info.value)


@pytest.mark.parametrize("token", BAD_TOKENS, ids=lambda v: repr(v)[:24])
def test_ready_token_rejected(token):
    with pytest.raises(LocalProtocolError) as info:
        Ready(**{**READY, "token": token})
    assert info.value.code is ErrorCode.MALFORMED
    assert "token" in str(info.value)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"streams": 0}, ("streams",)),
        ({"streams": MAX_STREAMS + 1}, ("streams", str(MAX_STREAMS))),
        ({"token": b"\x00" * 15}, ("token", "16")),
        ({"token": "x" * 16}, ("token",)),
    ],
    ids=repr,
)
def test_ready_v3_fields_malformed_on_the_wire(changes, words):
    err = _malformed(Ready, {**Ready(**READY).to_body(), **changes})
    assert all(word in str(err) for word in words), str(err)


def test_v2_ready_is_malformed():
    err = _malformed(Ready, {"migration_id": "m", "prefault_ms": 0})  # what a v2 destination sends
    assert "streams" in str(err) and "token" in str(err)


@pytest.mark.parametrize("stream", range(MAX_STREAMS))
def test_join_streams_ok(stream):
    join = Join(**{**JOIN, "stream": stream})
    assert join.stream == stream


def test_join_round_trip():
    join = Join(migration_id="m" * 64, stream=MAX_STREAMS - 1, token=TOKEN)
    assert join.TYPE is MsgType.JOIN and REGISTRY[MsgType.JOIN] is Join
    body = join.to_body()
    assert body == {"migration_id": "m" * 64, "stream": MAX_STREAMS - 1, "token": TOKEN}
    assert Join.from_body(body) == join and type(Join.from_body(body)) is Join
    frame = encode_frame(join)
    prefix = parse_prefix(frame[:PREFIX_SIZE])
    assert prefix.type is MsgType.JOIN and prefix.payload_len == 0
    decoder = FrameDecoder()
    decoder.receive_data(frame)
    decoder.receive_data(b"")
    assert decoder.next_event() == join and decoder.next_event() is CLOSED


@pytest.mark.parametrize("stream", [MAX_STREAMS, MAX_STREAMS + 1, 255, -1, U64_MAX, U64_MAX + 1, *NOT_INTS], ids=repr)
def test_join_stream_rejected(stream):
    with pytest.raises(LocalProtocolError) as info:
        Join(**{**JOIN, "stream": stream})
    assert info.value.code is ErrorCode.MALFORMED
    assert "stream" in str(info.value) and "Join" in str(info.value)


@pytest.mark.parametrize("token", BAD_TOKENS, ids=lambda v: repr(v)[:24])
def test_join_token_rejected(token):
    with pytest.raises(LocalProtocolError) as info:
        Join(**{**JOIN, "token": token})
    assert info.value.code is ErrorCode.MALFORMED
    assert "token" in str(info.value)


@pytest.mark.parametrize("mid", ["", "x" * 65, b"m", None, 1], ids=repr)
def test_join_migration_id_rejected(mid):
    with pytest.raises(LocalProtocolError) as info:
        Join(**{**JOIN, "migration_id": mid})
    assert info.value.code is ErrorCode.MALFORMED
    assert "migration_id" in str(info.value)


def test_join_migration_id_limits_inclusive():
    assert Join(**{**JOIN, "migration_id": "x"}).migration_id == "x"
    assert Join(**{**JOIN, "migration_id": "ü" * 64}).migration_id == "ü" * 64


@pytest.mark.parametrize(
    "changes, word",
    [
        ({"stream": MAX_STREAMS}, "stream"),
        ({"stream": -1}, "stream"),
        ({"token": b""}, "token"),
        ({"migration_id": ""}, "migration_id"),
        ({"round": 0}, "round"),  # a PageBatch key: unknown here
    ],
    ids=repr,
)
def test_join_malformed_on_the_wire(changes, word):
    assert word in str(_malformed(Join, {**Join(**JOIN).to_body(), **changes}))


@pytest.mark.parametrize(
    "msg_type, good, bad",
    [
        (MsgType.JOIN, dict(JOIN), {**JOIN, "stream": MAX_STREAMS}),
        (MsgType.JOIN, dict(JOIN), {**JOIN, "token": TOKEN[:8]}),
        (MsgType.READY, dict(READY), {**READY, "streams": 0}),
        (MsgType.READY, dict(READY), {**READY, "token": TOKEN * 2}),
        (MsgType.PREPARE, Prepare(**PREPARE).to_body(), {**Prepare(**PREPARE).to_body(), "streams": MAX_STREAMS + 1}),
    ],
    ids=["join-stream", "join-token", "ready-streams", "ready-token", "prepare-streams"],
)
def test_invalid_v3_values_are_malformed_when_decoding_a_frame(msg_type, good, bad):
    """The whole input path (FrameDecoder), not only from_body."""
    decoder = FrameDecoder()
    decoder.receive_data(_raw_frame(msg_type, good))
    assert type(decoder.next_event()) is REGISTRY[msg_type]
    decoder = FrameDecoder()
    decoder.receive_data(_raw_frame(msg_type, bad))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.code is ErrorCode.MALFORMED
