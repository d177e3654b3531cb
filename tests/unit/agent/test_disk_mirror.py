"""The disk mirror's pieces on real files and a real shm dirty map, the
guest's part played by the test (pwrite the block, then mark it, as
memstore.guest does): sparse bulk copy, dirty rounds, read-back
verification catching a changed byte (recopied) or a copy that stays wrong
(fails), data where the copier never wrote, zero blocks, run helpers, and
the write-wait meter."""
from __future__ import annotations

import os
import threading
import time

import pytest

from memstore import BLOCK_SIZE, DiskImage, DiskMap
from agent.migration.disk import (CHUNK_BLOCKS, DIGEST_BYTES, ZERO_BLOCK_DIGEST, DiskMirror, LocalSink, VerifyFailed,
                                  WriteWaitMeter, block_runs, chunk_digests, split_runs)

BS = BLOCK_SIZE
SIZE = 8 << 20                    # 128 blocks


@pytest.fixture
def disk(tmp_path, shm_prefix):
    """(segment name, source image path) with a dirty map d0; removed after."""
    seg = f"{shm_prefix}.unit.vm.00000000"
    src = str(tmp_path / "src.img")
    with DiskImage.create(src, SIZE) as img:
        for b in (3, 4, 5, 40, 100):
            img.write_blocks(b, os.urandom(BS))
        img.write_blocks(60, bytes(BS))                       # allocated, but zeros
    dm = DiskMap.create(seg, 0, src, SIZE)
    dm.close()
    yield seg, src
    DiskMap.attach(seg, 0).unlink()


def guest_write(seg: str, src: str, block: int, data: bytes | None = None) -> bytes:
    data = data or os.urandom(BS)
    with DiskImage.open(src) as img:
        img.write_blocks(block, data)                      # W ...
    with DiskMap.attach(seg, 0) as dm:
        dm.dirty[block] = 1                                # ... then M
    return data


def same_content(a: str, b: str) -> bool:
    with open(a, "rb") as f, open(b, "rb") as g:
        return f.read() == g.read()


def mirror(seg, src, tmp_path) -> DiskMirror:
    return DiskMirror(0, "root", seg, src, LocalSink(str(tmp_path / "copy.img"), SIZE))


def copy_all(m: DiskMirror) -> None:
    for first, count in m.bulk:
        m.copy_run(first, count)
    m.bulk_pos = len(m.bulk)


def test_bulk_copy_is_sparse_and_verified(disk, tmp_path):
    seg, src = disk
    m = mirror(seg, src, tmp_path)
    try:
        guest_write(seg, src, 7)                           # before tracking: the scan and bulk read see it
        m.start_tracking()
        assert m.collect() == 0                            # the marks before tracking were discarded
        assert [tuple(r) for r in m.bulk] == [(3, 3), (7, 1), (40, 1), (60, 1), (100, 1)]
        copy_all(m)
        assert m.verify() == 0 and m.c.zero_blocks == 1
        assert m.c.bytes_copied == 6 * BS                  # 3..7, 40, 100: not the zero block 60
        m.final_check()
        m.check_extents()
        assert same_content(src, m.sink.path)
        assert m.sink.allocated_bytes() == 6 * BS         # holes stayed holes, the zero block too
        assert [tuple(r) for r in m.sink.data_blocks()] == [(3, 3), (7, 1), (40, 1), (100, 1)]
    finally:
        m.sink.close()
        m.close()


def test_dirty_rounds_and_a_block_that_becomes_zero(disk, tmp_path):
    seg, src = disk
    m = mirror(seg, src, tmp_path)
    try:
        m.start_tracking()
        copy_all(m)
        guest_write(seg, src, 4)                           # rewritten after the bulk read
        guest_write(seg, src, 90)                          # a hole that gets data
        guest_write(seg, src, 40, bytes(BS))               # data that becomes zeros: punched on the copy
        assert m.collect() == 3 and sorted(m.pending) == [4, 40, 90]
        for first, count in m.take_pending():
            m.copy_run(first, count)
        assert m.verify() == 0 and not m.pending
        m.final_check()
        assert same_content(src, m.sink.path)
        assert [tuple(r) for r in m.sink.data_blocks()] == [(3, 3), (90, 1), (100, 1)]
    finally:
        m.sink.close()
        m.close()


def test_read_back_catches_a_changed_byte_and_recopies(disk, tmp_path):
    seg, src = disk
    m = mirror(seg, src, tmp_path)
    try:
        m.start_tracking()
        copy_all(m)
        with open(m.sink.path, "r+b") as f:                 # the storage changes a byte under us
            f.seek(40 * BS + 123)
            b = f.read(1)
            f.seek(40 * BS + 123)
            f.write(bytes([b[0] ^ 1]))
        assert m.verify() == 1 and m.pending == {40} and m.c.mismatches == 1
        with pytest.raises(VerifyFailed, match="1 blocks still to copy"):
            m.final_check()
        for first, count in m.take_pending():
            m.copy_run(first, count)
        assert m.verify() == 0
        m.final_check()
        assert same_content(src, m.sink.path)
    finally:
        m.sink.close()
        m.close()


def test_a_copy_that_stays_wrong_fails(disk, tmp_path):
    seg, src = disk
    m = mirror(seg, src, tmp_path)
    m.sink.fault_block, m.sink.fault_always = 100, True   # what LIVEMIG_FAULT_INJECT=corrupt-disk-copy-always does
    try:
        m.start_tracking()
        copy_all(m)
        with pytest.raises(VerifyFailed, match="block 100 .* read back wrong 3 times"):
            for _ in range(5):
                m.verify()
                for first, count in m.take_pending():
                    m.copy_run(first, count)
    finally:
        m.sink.close()
        m.close()


def test_final_check_catches_data_the_copier_never_wrote(disk, tmp_path):
    seg, src = disk
    m = mirror(seg, src, tmp_path)
    try:
        m.start_tracking()
        copy_all(m)
        m.verify()
        with open(m.sink.path, "r+b") as f:                 # an offset bug would look like this
            f.seek(77 * BS)
            f.write(b"x" * 10)
        m.final_check()                                   # the digests of what it wrote are right...
        with pytest.raises(VerifyFailed, match="holds data in block 77, which the copier never wrote"):
            m.check_extents()                             # ... but there is data where it never wrote
    finally:
        m.sink.close()
        m.close()


def test_local_sink_is_exclusive(tmp_path):
    p = str(tmp_path / "x.img")
    LocalSink(p, SIZE).close()
    with pytest.raises(Exception, match="cannot create disk image"):
        LocalSink(p, SIZE)


def test_run_helpers_and_chunk_digests():
    assert block_runs([1, 2, 3, 7, 8, 20]) == [(1, 3), (7, 2), (20, 1)]
    assert block_runs(list(range(40)), 16) == [(0, 16), (16, 16), (32, 8)]
    assert split_runs([(5, 40)]) == [(5, 16), (21, 16), (37, 8)]
    digests = ZERO_BLOCK_DIGEST * (CHUNK_BLOCKS * 2 + 1)
    chunks = chunk_digests(digests)
    assert len(chunks) == 3 * DIGEST_BYTES and chunks[:16] == chunks[16:32] != chunks[32:]


def test_write_wait_meter_measures_stalls():
    counter = [0]
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0.002)                       # ok: the simulated guest's write pace
            if counter[0] == 50:
                time.sleep(0.15)                            # ok: one long stall, what the meter must see

    t = threading.Thread(target=writer)
    meter = WriteWaitMeter(lambda: counter[0]).start()
    t.start()
    deadline = time.monotonic() + 10
    while counter[0] < 120 and time.monotonic() < deadline:
        time.sleep(0.01)                            # poll: until 120 writes or the deadline
    stop.set()
    t.join()
    meter.stop()
    s = meter.summary()
    assert s["samples"] > 50 and 140 <= s["max_ms"] < 400 and s["p99_ms"] <= s["max_ms"]
    assert meter.summary(("nothing",)) == {"p99_ms": None, "max_ms": None, "samples": 0}
