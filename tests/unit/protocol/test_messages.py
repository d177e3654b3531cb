"""Messages: exhaustiveness, round trips, validation, strict from_body."""

from __future__ import annotations

import dataclasses

import pytest

from protocol import (
    MAX_BATCH_PAGES,
    MAX_BATCH_RUNS,
    MAX_BLOB_BYTES,
    MAX_FEATURES,
    MAX_STRING,
    PAGE_SIZE,
    REGISTRY,
    U64_MAX,
    Abort,
    Auth,
    BatchFlags,
    Committed,
    Digests,
    ErrorCode,
    Hello,
    LocalProtocolError,
    Message,
    MsgType,
    PageBatch,
    Prepare,
    Ready,
    Reject,
    RemoteProtocolError,
    StateTransfer,
    Welcome,
)
from protocol import wire

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
    assert ErrorCode.MALFORMED == 1 and ErrorCode.INCOMPATIBLE == 17
    assert len(MsgType) == 18 and len(ErrorCode) == 17
    assert BatchFlags.NONE == 0 and BatchFlags.ZERO == 1


def test_limits():
    assert wire.PAGE_SIZE == 4096
    assert wire.MAGIC == b"LMIG"
    assert wire.MAX_FRAME_BYTES == 4 * 1024 * 1024
    assert wire.MAX_PAYLOAD_BYTES == 64 * 1024 * 1024
    assert wire.MAX_BATCH_PAGES * PAGE_SIZE <= wire.MAX_PAYLOAD_BYTES
    assert wire.MIN_PROTOCOL_VERSION <= wire.PROTOCOL_VERSION


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
    batch = PageBatch(round=1, runs=((3, 2), (9, 1)), flags=BatchFlags.NONE, payload_len=3 * PAGE_SIZE)
    assert batch.to_body() == {"round": 1, "runs": [3, 2, 9, 1], "flags": 0, "payload_len": 3 * PAGE_SIZE}
    assert batch.pages == 3
    assert PageBatch.from_body(batch.to_body()).runs == ((3, 2), (9, 1))


def test_enums_are_normalised_and_sent_as_ints():
    reject = Reject(code=8, reason="x")
    assert reject.code is ErrorCode.AUTH_FAILED
    assert type(reject.to_body()["code"]) is int
    batch = PageBatch(round=0, runs=((0, 1),), flags=1, payload_len=0)
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
    migration_id="m", vm="vm", memory_bytes=PAGE_SIZE, workload="", features=(), source="s", populated=()
)


@pytest.mark.parametrize("populated", [((0, 2),), ((1, 1), (5, 3))])
def test_prepare_populated_runs_ok(populated):
    assert Prepare(**{**PREPARE, "memory_bytes": 8 * PAGE_SIZE, "populated": populated}).populated == populated


@pytest.mark.parametrize("populated", [((0, 9),), ((7, 2),), ((0, 0),), ((-1, 1),), ((0,),), [(0, 1)]])
def test_prepare_populated_runs_bad(populated):
    with pytest.raises(LocalProtocolError):
        Prepare(**{**PREPARE, "memory_bytes": 8 * PAGE_SIZE, "populated": populated})


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
        Ready(migration_id=mid, prefault_ms=0)


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
        PageBatch(round=0, runs=runs, flags=flags, payload_len=payload_len)


def test_page_batch_limits_inclusive():
    full = PageBatch(
        round=0,
        runs=tuple((i * 8, 4) for i in range(MAX_BATCH_RUNS)),
        flags=BatchFlags.NONE,
        payload_len=MAX_BATCH_PAGES * PAGE_SIZE,
    )
    assert full.pages == MAX_BATCH_PAGES
    zero = PageBatch(round=0, runs=((U64_MAX - 1, 1),), flags=BatchFlags.ZERO, payload_len=0)
    assert zero.pages == 1


def test_page_batch_pages_not_compared():
    a = PageBatch(round=0, runs=((0, 2),), flags=BatchFlags.ZERO, payload_len=0)
    assert "_pages" not in repr(a)
    assert a == PageBatch.from_body(a.to_body())
    assert hash(a) == hash(PageBatch.from_body(a.to_body()))


def test_state_transfer_total_limit():
    half = MAX_BLOB_BYTES // 2
    StateTransfer(vcpu_state=b"\0" * half, device_state=b"\0" * (MAX_BLOB_BYTES - half))
    with pytest.raises(LocalProtocolError):
        StateTransfer(vcpu_state=b"\0" * half, device_state=b"\0" * (MAX_BLOB_BYTES - half + 1))


@pytest.mark.parametrize("digests, chunk_pages", [(b"\0" * 15, 1), (b"\0" * 17, 1), (b"", 0)])
def test_digests_rejects(digests, chunk_pages):
    with pytest.raises(LocalProtocolError):
        Digests(chunk_pages=chunk_pages, digests=digests)


def test_digests_count():
    assert Digests(chunk_pages=1, digests=b"\0" * 48).count == 3
    assert Digests(chunk_pages=1, digests=b"").count == 0


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
    body = Ready(migration_id="m", prefault_ms=1).to_body()
    body["prefault_ms"] = True
    _malformed(Ready, body)
    body = PageBatch(round=0, runs=((0, 1),), flags=BatchFlags.ZERO, payload_len=0).to_body()
    body["runs"] = [0, True]
    _malformed(PageBatch, body)


def test_bytes_keys_are_unknown():
    _malformed(Ready, {b"migration_id": "m", "prefault_ms": 1})


@pytest.mark.parametrize("runs", [[], [1], [0, 1, 2], [[0, 1]], [0, -1], "0,1"], ids=repr)
def test_page_batch_bad_wire_runs(runs):
    _malformed(PageBatch, {"round": 0, "runs": runs, "flags": 1, "payload_len": 0})


def test_page_batch_too_many_runs_on_wire():
    runs = [0, 1] * (MAX_BATCH_RUNS + 1)
    err = _malformed(PageBatch, {"round": 0, "runs": runs, "flags": 1, "payload_len": 0})
    assert str(MAX_BATCH_RUNS) in str(err)


def test_unknown_error_code_on_wire():
    _malformed(Abort, {"code": 99, "reason": "x"})
