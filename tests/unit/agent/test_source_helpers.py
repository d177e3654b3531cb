import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.migration.scheduler import LiveSlots, PairLimits
from agent.migration.ram import batches


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 2000)), max_size=50),
       st.integers(1, 512), st.integers(1, 64))
def test_batches_cover_runs_exactly(runs, max_pages, max_runs):
    out = list(batches(runs, max_pages, max_runs))
    flat = [(f + i) for b in out for f, c in b for i in range(c)]
    assert flat == [(f + i) for f, c in runs for i in range(c)]
    for b in out:
        assert 1 <= len(b) <= max_runs
        assert sum(c for _, c in b) <= max_pages


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_live_slots_fifo_and_limit():
    s = LiveSlots(2)
    assert s.try_acquire() and s.try_acquire() and not s.try_acquire()
    order = []

    async def waiter(i):
        await s.acquire()
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0)  # ok: one loop turn, not a wait
    assert order == []
    s.release()
    await asyncio.wait_for(_until(lambda: order == [0]), 5)
    s.set_limit(4)                        # raising the limit at run time admits the queue
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [0, 1, 2] and s.in_use == 4


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_live_slots_cancelled_waiter_leaves_queue():
    s = LiveSlots(1)
    assert s.try_acquire()
    t = asyncio.create_task(s.acquire())
    await asyncio.sleep(0)  # ok: one loop turn, not a wait
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    s.release()
    assert s.in_use == 0 and s.try_acquire()


async def _until(cond):
    while not cond():
        await asyncio.sleep(0)  # ok: one loop turn, not a wait


def test_populated_runs_follow_the_data_and_prefault_only_them(shm_prefix):
    import os

    from agent.migration.ram import populated_runs
    from memstore import PAGE_SIZE, GuestRam

    ram = GuestRam.create(f"{shm_prefix}.pop", 64 * PAGE_SIZE)
    try:
        assert populated_runs(ram, 8) == []                 # never written: nothing to pre-fault
        ram.ram[3 * PAGE_SIZE] = 1                          # chunk 0
        ram.ram[9 * PAGE_SIZE] = 1                          # chunk 1 (adjacent: merged)
        ram.ram[40 * PAGE_SIZE] = 1                         # chunk 5
        runs = populated_runs(ram, 8)
        assert runs == [(0, 16), (40, 8)]
        dest = GuestRam.create(f"{shm_prefix}.pop2", 64 * PAGE_SIZE)
        try:
            before = os.fstat(dest.fd).st_blocks * 512
            dest.prefault(runs)
            grown = os.fstat(dest.fd).st_blocks * 512 - before
            assert grown == 24 * PAGE_SIZE                  # exactly the runs, not all 64 pages
        finally:
            dest.close()
            dest.unlink()
    finally:
        ram.close()
        ram.unlink()
