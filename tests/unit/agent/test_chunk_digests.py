"""ChunkDigests (agent/migration/verify.py) on a real shared-memory segment.

The incremental digests must equal a full hash of the memory whatever the
order of writes, marks and background hashing, holes included: a chunk is
called zero without being read only when the segment really has no data
there. The hole lookups are cached per data extent (guest RAM is never
punched), so the property also covers memory that starts as holes and is
written later, chunk by chunk, like a destination shell filling up.
"""
from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from memstore import PAGE_SIZE, GuestRam, chunk_digests
from agent.migration.verify import ChunkDigests

pytestmark = pytest.mark.timeout(120)

NPAGES = 96
CP = 4


@pytest.fixture
def ram(shm_prefix):
    r = GuestRam.create(f"{shm_prefix}.digests", NPAGES * PAGE_SIZE)
    try:
        yield r
    finally:
        r.close()
        r.unlink()


def _holes_again(ram) -> None:
    """Every RAM page a hole again (the header before ram_offset stays)."""
    size = os.stat(ram.path).st_size
    os.truncate(ram.path, ram.ram_offset)
    os.truncate(ram.path, size)


ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, NPAGES - 1), st.integers(1, 6), st.booleans()),
    st.tuples(st.just("hash"), st.lists(st.integers(0, NPAGES // CP - 1), max_size=12)),
    st.tuples(st.just("drain")),
), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, fresh_zero=st.booleans(), mode=st.sampled_from(["incremental", "full"]))
def test_digests_equal_a_full_hash_whatever_the_order(ram, ops, fresh_zero, mode):
    _holes_again(ram)

    async def run():
        d = ChunkDigests(ram.ram, CP, ram.next_data_page, ram.next_hole_page, fresh_zero=fresh_zero)
        try:
            for op in ops:
                if op[0] == "write":
                    _, first, count, zeros = op
                    count = min(count, NPAGES - first)
                    data = bytes(count * PAGE_SIZE) if zeros else os.urandom(count * PAGE_SIZE)
                    ram.ram[first * PAGE_SIZE:(first + count) * PAGE_SIZE] = data
                    d.mark(((first, count),))                 # after the bytes changed
                elif op[0] == "hash":
                    d._hash(sorted(set(op[1])))               # a worker batch, in this thread
                else:
                    await d.drain()
            got = await d.finish(mode)
        finally:
            d.close()
        return got

    got = asyncio.run(run())
    want = chunk_digests(ram.ram, CP, ram.next_data_page, ram.next_hole_page)
    # A fresh shell's digests start as zeros; any other start (fresh_zero off)
    # treats every chunk as stale, so both must come out as the full hash.
    assert got == want


def test_a_hole_written_after_its_generation_was_read_is_never_called_zero(ram):
    """The lookup that calls a page a hole runs after the generations of its
    batch were read: a write (and its mark) between the two makes the chunk
    stale, never wrongly "hashed" as zeros at the new generation."""
    _holes_again(ram)
    d = ChunkDigests(ram.ram, CP, ram.next_data_page, ram.next_hole_page, fresh_zero=True)
    real = ram.next_data_page
    page = 8

    def racing_lookup(p: int) -> int:
        # the guest writes page 8 and marks it while the worker is between
        # reading the generations and looking up the holes
        if p <= page and not ram.ram[page * PAGE_SIZE]:
            ram.ram[page * PAGE_SIZE] = 0xAB
            d.gen[page // CP] += 1
        return real(p)

    d._data = racing_lookup
    try:
        d._hash([page // CP])
        # the write happened after the generation was read: the chunk is stale
        # (it will be rehashed), or it was hashed with the byte in it
        c = page // CP
        stale = d.hashed[c] != d.gen[c]
        if not stale:
            assert bytes(d.digests[c * 16:(c + 1) * 16]) == chunk_digests(ram.ram, CP)[c * 16:(c + 1) * 16]
        assert asyncio.run(d.finish()) == chunk_digests(ram.ram, CP, real, ram.next_hole_page)
    finally:
        d.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(st.tuples(st.integers(0, NPAGES - 1), st.integers(1, 6), st.booleans()), max_size=30))
def test_hash_now_in_the_writing_thread_equals_a_full_hash(ram, writes):
    """The destination's receiving stream hashes what it just wrote
    (hash_now); the digests then need no worker and equal a full hash."""
    _holes_again(ram)

    async def run():
        d = ChunkDigests(ram.ram, CP, ram.next_data_page, ram.next_hole_page, fresh_zero=True)
        try:
            for first, count, zeros in writes:
                count = min(count, NPAGES - first)
                data = bytes(count * PAGE_SIZE) if zeros else os.urandom(count * PAGE_SIZE)
                ram.ram[first * PAGE_SIZE:(first + count) * PAGE_SIZE] = data
                d.hash_now(((first, count),))
            await d.drain()                  # nothing pending: returns at once
            return await d.finish("incremental"), d._inflight
        finally:
            d.close()

    got, inflight = asyncio.run(run())
    assert inflight is None                  # no worker batch was ever needed
    assert got == chunk_digests(ram.ram, CP, ram.next_data_page, ram.next_hole_page)
