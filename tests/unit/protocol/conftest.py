"""Shared example table for the protocol unit tests."""

from __future__ import annotations

import msgpack
import pytest

from protocol import (
    MIN_PROTOCOL_VERSION,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Abort,
    Auth,
    BatchFlags,
    Commit,
    Committed,
    Digests,
    ErrorCode,
    Hello,
    Join,
    Message,
    MsgType,
    PageBatch,
    Prepare,
    Query,
    QueryResult,
    Ready,
    Reject,
    Resume,
    Resumed,
    RoundAck,
    RoundEnd,
    SectionState,
    StateTransfer,
    Welcome,
)

MIGRATION_ID = "mig-0001"
#: Section names of the example Prepare (ids 0, 1, 2 in this order).
SECTIONS = ("ram", "disk0", "devices")
#: The example Prepare's setup blob: one msgpack map per section (opaque to
#: the protocol, but realistic).
SETUP = msgpack.packb([{"bytes": 256 * PAGE_SIZE}, {"bytes": 1 << 20}, {}])
#: The example Ready's data-stream token, which the example Join carries back.
TOKEN = bytes(range(16))


def make_examples(migration_id: str = MIGRATION_ID) -> dict[MsgType, Message]:
    """One valid instance per MsgType (ids consistent for session tests)."""
    examples: list[Message] = [
        Hello(
            version_min=MIN_PROTOCOL_VERSION,
            version_max=PROTOCOL_VERSION,
            agent="src-host:7070",
            features=("zero-pages", "digests-xxh3-128"),
            max_live_migrations=4,
            nonce=bytes(range(16)),
        ),
        Welcome(
            version=PROTOCOL_VERSION,
            agent="dst-host:7070",
            features=("zero-pages",),
            max_live_migrations=2,
            slots=2,
            nonce=bytes(range(16, 32)),
            proof=b"\x01" * 32,
            slots_free=1,
            memory_free_bytes=8 * 2**30,
            status="maintenance",
        ),
        Auth(proof=b"\x02" * 32),
        Reject(code=ErrorCode.BUSY, reason="no free slot"),
        Prepare(
            migration_id=migration_id,
            vm="vm-ünïcode",
            memory_bytes=256 * PAGE_SIZE,
            workload="memtouch --rate 10",
            features=(),
            source="10.0.0.1:7070",
            sections=SECTIONS,
            setup=SETUP,
            verify_mode="incremental",
            streams=2,
        ),
        Ready(migration_id=migration_id, prefault_ms=12, streams=2, token=TOKEN),
        PageBatch(
            section=1,
            round=3,
            runs=((0, 2), (10, 1), (2**40, 3)),
            flags=BatchFlags.NONE,
            payload_len=6 * PAGE_SIZE,
        ),
        RoundEnd(round=3, pages_sent=6, dirty_pages=1),
        StateTransfer(vcpu_state=b"\x00regs\xff", device_state=b""),
        Digests(section=2, chunk_pages=64, digests=bytes(range(32))),
        Resume(migration_id=migration_id),
        Resumed(writes=17),
        Commit(migration_id=migration_id),
        Committed(),
        Query(migration_id=migration_id),
        QueryResult(migration_id=migration_id, state="running"),
        Abort(code=ErrorCode.CANCELLED, reason="operator cancelled"),
        RoundAck(round=3),
        SectionState(section=2, data=b"\x00dev-regs\xff"),
        Join(migration_id=migration_id, stream=1, token=TOKEN),  # stream 1 of Ready's 2
    ]
    table = {msg.TYPE: msg for msg in examples}
    assert len(table) == len(examples)
    return table


@pytest.fixture
def examples() -> dict[MsgType, Message]:
    return make_examples()


@pytest.fixture
def example_factory():
    """``make_examples`` itself, for tests that need another migration id."""
    return make_examples


@pytest.fixture
def zero_batch() -> PageBatch:
    return PageBatch(section=0, round=0, runs=((5, 100),), flags=BatchFlags.ZERO, payload_len=0)
