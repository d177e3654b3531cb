"""The guest's disk IO, against real guest processes writing real sparse
image files: what lands on disk (checked against disk_write_for), dirty
marks after the data, disk pause/reopen/resume while RAM writes go on, the
dirty-block race with a right and two wrong collectors, vCPU state
continuity across a "migration" and a guest restart, ENOSPC on the disk's
filesystem. Every wait is a deadline-bounded poll."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import struct
import time

import msgpack
import pytest

from memstore.control import Cmd, DiskCmd, DiskIoState, GuestState
from memstore.disk import (
    BLOCK_SIZE,
    DiskImage,
    DiskMap,
    add_disk,
    list_disks,
    pause_disk_io,
    reopen_disk,
    resume_disk_io,
)
from memstore.errors import DiskError
from memstore.guest import EXIT_ATTACH, EXIT_OK, launch_guest
from memstore.workload import disk_write_for, io_ws_blocks, parse_workload
from memstore_testlib import WAIT_S, command, wait_for

BS = BLOCK_SIZE
HEAD = struct.Struct("<QQ")


def replay(spec: str, sizes, seed: int, first: int, last: int, cursor: int = 0):
    """{(disk, block): last write number} for disk writes first..last."""
    wl = parse_workload(spec)
    ws = io_ws_blocks(wl, [(s, BS) for s in sizes])
    out = {}
    for k in range(first, last + 1):
        d, b, cursor = disk_write_for(wl, ws, seed, k, cursor)
        out[(d, b)] = k
    return out


def headers(path: str):
    """{block: (counter, tag)} of every block of the image that holds data."""
    out = {}
    with DiskImage.open(path, readonly=True) as img:
        for first, count in img.data_blocks():
            data = img.read_blocks(first, count)
            for i in range(count):
                out[first + i] = HEAD.unpack_from(data, i * BS)
    return out


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def copy_image(src: str, dst: str) -> None:
    """What a storage move's copier does at its simplest: data blocks only."""
    with DiskImage.open(src, readonly=True) as a, DiskImage.create(dst, a.size_bytes) as b:
        for first, count in a.data_blocks():
            b.write_blocks(first, a.read_blocks(first, count))


def test_guest_writes_its_disks(disk_vm, guests):
    spec, seed = "uniform:rate=2000,io=1000,iows=1M", 0xD15C
    sizes = (4 << 20, 2 << 20)
    ram, paths = disk_vm("io", 1 << 20, sizes)
    guests(ram, spec, seed=seed, start=Cmd.RUN)
    assert ram.ctl.disk_io_state is DiskIoState.RUNNING
    wait_for(lambda: ram.ctl.io_writes >= 300, what="300 disk writes")
    wait_for(lambda: ram.ctl.io_rate_wps > 0, timeout_s=3, what="disk write rate")
    assert 500 <= ram.ctl.io_rate_wps <= 1100, ram.ctl.io_rate_wps
    command(ram, Cmd.PAUSE)
    n, writes = ram.ctl.io_writes, ram.ctl.writes
    assert writes > 0                                   # RAM writes went on alongside
    expect = replay(spec, sizes, seed, 1, n)
    got = {}
    for d, path in enumerate(paths):
        with DiskImage.open(path, readonly=True) as img:
            written = sum(1 for dd, _ in expect if dd == d) * BS
            assert written <= img.allocated_bytes() <= written + BS   # + extent-tree blocks
        with DiskMap.attach(ram.name, d) as dm:
            marked = {b for b in range(dm.nblocks) if dm.dirty[b]}
        for b, (k, tag) in headers(path).items():
            got[(d, b)] = k
            assert tag == seed ^ (d << 56) ^ b
        assert marked == {b for dd, b in expect if dd == d}
        assert all(b < 16 for dd, b in expect if dd == d)   # iows=1M: the first 16 blocks
    assert got == expect          # every block holds exactly its last write, nothing else
    assert {d for d, _ in expect} == {0, 1}


def test_disk_pause_reopen_resume_while_ram_runs(disk_vm, guests, tmp_path):
    spec = "uniform:rate=5000,io=2000"
    ram, (old,) = disk_vm("mv", 1 << 20, (2 << 20,))
    guests(ram, spec, seed=3, start=Cmd.RUN)
    wait_for(lambda: ram.ctl.io_writes >= 50, what="disk writes")
    pause_s = pause_disk_io(ram.ctl)
    t_paused = time.monotonic()
    assert ram.ctl.disk_io_state is DiskIoState.PAUSED and ram.ctl.disk_result == 0
    assert ram.ctl.guest_state is GuestState.RUNNING
    n0, w0 = ram.ctl.io_writes, ram.ctl.writes
    digest0 = file_digest(old)
    wait_for(lambda: ram.ctl.writes >= w0 + 500, what="RAM writes while disk IO is paused")
    assert ram.ctl.io_writes == n0 and file_digest(old) == digest0

    new = str(tmp_path / "moved.img")
    copy_image(old, new)
    # the guest refuses a path it cannot use and keeps its file
    with DiskMap.attach(ram.name, 0) as dm:
        dm.stage_path(str(tmp_path / "missing.img"))
    seq = ram.ctl.disk_command(DiskCmd.REOPEN, 0)
    assert ram.ctl.wait_disk_acknowledged(seq, WAIT_S)
    assert ram.ctl.disk_result == errno.ENOENT
    small = str(tmp_path / "small.img")
    DiskImage.create(small, BS).close()
    with DiskMap.attach(ram.name, 0) as dm:
        dm.stage_path(small)
    seq = ram.ctl.disk_command(DiskCmd.REOPEN, 0)
    assert ram.ctl.wait_disk_acknowledged(seq, WAIT_S)
    assert ram.ctl.disk_result == errno.EINVAL
    with pytest.raises(DiskError, match="bytes, disk 0 is"):
        reopen_disk(ram, 0, small)                  # checked before asking the guest
    seq = ram.ctl.disk_command(DiskCmd.REOPEN, 5)
    assert ram.ctl.wait_disk_acknowledged(seq, WAIT_S) and ram.ctl.disk_result == errno.EINVAL
    assert list_disks(ram)[0].path == old

    reopen_s = reopen_disk(ram, 0, new)
    assert list_disks(ram)[0].path == new
    assert ram.ctl.disk_io_state is DiskIoState.PAUSED     # a reopen does not resume
    resume_s = resume_disk_io(ram.ctl)
    io_pause_ms = (time.monotonic() - t_paused) * 1000
    assert ram.ctl.disk_io_state is DiskIoState.RUNNING
    wait_for(lambda: ram.ctl.io_writes >= n0 + 100, what="disk writes after the reopen")
    command(ram, Cmd.PAUSE)
    assert file_digest(old) == digest0                  # the old file is left alone
    new_counts = [k for k, _ in headers(new).values()]
    assert max(new_counts) > n0 and max(k for k, _ in headers(old).values()) <= n0
    # the new file is the old one plus exactly the writes after the switch
    expect = replay(spec, (2 << 20,), 3, 1, ram.ctl.io_writes)
    assert {(0, b): k for b, (k, _) in headers(new).items()} == expect
    print(f"disk pause {pause_s * 1e3:.2f} ms, reopen {reopen_s * 1e3:.2f} ms, "
          f"resume {resume_s * 1e3:.2f} ms; disk IO paused {io_pause_ms:.0f} ms (incl. test checks)")
    assert pause_s < 0.5 and reopen_s < 0.5 and resume_s < 0.5


def test_guest_without_disks_is_unchanged(make_ram, guests):
    ram = make_ram("plain", 1 << 20)
    guests(ram, "uniform:rate=20000,io=100", seed=5, start=Cmd.RUN)   # io but no disk: no IO
    assert ram.ctl.disk_io_state is DiskIoState.RUNNING
    pause_disk_io(ram.ctl)                        # disk commands are still acknowledged
    assert ram.ctl.disk_io_state is DiskIoState.PAUSED
    resume_disk_io(ram.ctl)
    w0 = ram.ctl.writes
    wait_for(lambda: ram.ctl.writes >= w0 + 2000, what="RAM writes")
    command(ram, Cmd.PAUSE)
    assert ram.ctl.io_writes == 0 and ram.ctl.ndisks == 0
    state = msgpack.unpackb(ram.ctl.vcpu_state())
    assert set(state) == {"writes", "seed", "cursor", "workload"}   # the old blob


def test_guest_refuses_to_start_without_its_disk(disk_vm, guests):
    ram, (path,) = disk_vm("gone", 1 << 20, (BS,))
    os.unlink(path)
    proc = guests(ram, "idle:io=10", wait=False)
    assert proc.wait(WAIT_S) == EXIT_ATTACH
    assert ram.ctl.guest_state is GuestState.NOT_STARTED


def test_io_state_continues_on_a_destination(disk_vm, guests, tmp_path):
    """A migration in small: pause, copy the disk, ship the vCPU state, run
    the copy -- io_writes and the write stream continue where they were."""
    spec, seed = "sequential:rate=1000,io=1000,iows=512K", 11
    src, (src_disk,) = disk_vm("src", 1 << 20, (1 << 20,))
    guests(src, spec, seed=seed, start=Cmd.RUN)
    wait_for(lambda: src.ctl.io_writes >= 20, what="disk writes")
    command(src, Cmd.PAUSE)
    n, cur = src.ctl.io_writes, src.ctl.io_cursor
    assert cur == n % 8                                 # sequential over 8 blocks
    blob = src.ctl.vcpu_state()
    state = msgpack.unpackb(blob)
    assert (state["io_writes"], state["io_cursor"]) == (n, cur)

    dst_disk = str(tmp_path / "dst.img")
    copy_image(src_disk, dst_disk)
    dst = disk_vm("dst", 1 << 20, ())[0]
    add_disk(dst, dst_disk)
    guests(dst, spec, seed=seed, start=Cmd.PAUSE)      # a standby guest, as a destination has
    dst.ctl.load_vcpu_state(blob)
    command(dst, Cmd.RUN)
    wait_for(lambda: dst.ctl.io_writes >= n + 20, what="disk writes on the destination")
    command(dst, Cmd.PAUSE)
    assert {(0, b): k for b, (k, _) in headers(dst_disk).items()} == \
        replay(spec, (1 << 20,), seed, 1, dst.ctl.io_writes)


def test_restarted_guest_finds_its_disks(disk_vm, guests, tmp_path):
    ram, (old,) = disk_vm("re", 1 << 20, (1 << 20,))
    proc = guests(ram, "idle:io=1000", seed=2, start=Cmd.RUN)
    wait_for(lambda: ram.ctl.io_writes >= 20, what="disk writes")
    pause_disk_io(ram.ctl)
    new = str(tmp_path / "re-new.img")
    copy_image(old, new)
    reopen_disk(ram, 0, new)
    command(ram, Cmd.STOP)
    assert proc.wait(WAIT_S) == EXIT_OK
    n = ram.ctl.io_writes
    guests(ram, start=Cmd.RUN)                          # a new guest on the same segment
    assert ram.ctl.disk_io_state is DiskIoState.PAUSED  # the disk pause outlives the guest
    resume_disk_io(ram.ctl)
    wait_for(lambda: ram.ctl.io_writes >= n + 20, what="disk writes after the restart")
    command(ram, Cmd.PAUSE)
    assert max(k for k, _ in headers(new).values()) > n
    assert max(k for k, _ in headers(old).values()) <= n


def test_enospc_on_the_disk_fails_disk_io_only(small_tmpfs, disk_vm, guests):
    ram, (path,) = disk_vm("full", 1 << 20, (64 << 20,), dir=small_tmpfs)   # 64 MiB sparse on 8 MiB
    proc = guests(ram, "uniform:rate=2000,io=5000", seed=8, start=Cmd.RUN)
    try:
        wait_for(lambda: ram.ctl.disk_io_state is DiskIoState.FAILED, what="disk IO failure")
        assert ram.ctl.disk_errno == errno.ENOSPC
        n, w0 = ram.ctl.io_writes, ram.ctl.writes
        wait_for(lambda: ram.ctl.writes >= w0 + 500, what="RAM writes after the disk failed")
        assert ram.ctl.io_writes == n and ram.ctl.guest_state is GuestState.RUNNING
        with DiskImage.open(path) as img, DiskMap.attach(ram.name, 0) as dm:
            marked = dm.collector().collect()
            assert marked                                  # every block written, even the failed one
            for first, count in marked:
                img.punch_blocks(first, count)             # make room again
        resume_disk_io(ram.ctl)
        wait_for(lambda: ram.ctl.io_writes > n, what="disk writes after the resume")
    finally:
        proc.kill()
        proc.wait(WAIT_S)
        os.unlink(path)


# --- the dirty-block race ------------------------------------------------------------

RACE_BLOCKS = 128
RACE_SPEC = "idle:io=5000"
WRITES_PER_CYCLE = 1000


def read_blocks(img, runs, copies):
    for first, count in runs:
        data = img.read_blocks(first, count)
        for i in range(count):
            copies[first + i] = data[i * BS : (i + 1) * BS]


def collect_right(col, img, copies):
    read_blocks(img, col.collect(), copies)


def collect_bulk_clear(col, img, copies):
    from memstore.dirtymap import runs_from_snapshot
    runs = runs_from_snapshot(col.snapshot())
    col.clear_all()       # erases marks set since the snapshot: those writes are lost
    read_blocks(img, runs, copies)


def collect_read_then_bulk_clear(col, img, copies):
    from memstore.dirtymap import runs_from_snapshot
    runs = runs_from_snapshot(col.snapshot())
    read_blocks(img, runs, copies)
    col.clear_all()


def disk_race_cycle(ram, img, col, copies, collector):
    resume_disk_io(ram.ctl)
    start = ram.ctl.io_writes
    rounds = 0
    deadline = time.monotonic() + 10
    while ram.ctl.io_writes < start + WRITES_PER_CYCLE and time.monotonic() < deadline:
        collector(col, img, copies)
        rounds += 1
    end = ram.ctl.io_writes      # a few writes after the last collection: they must be marked
    wait_for(lambda: ram.ctl.io_writes >= end + 5, what="disk writes after the last collect")
    pause_disk_io(ram.ctl)
    assert ram.ctl.io_writes >= start + WRITES_PER_CYCLE // 2, "guest too slow for a race"
    marks = col.snapshot()
    data = img.read_blocks(0, RACE_BLOCKS)
    lost, pending = [], 0
    for b in range(RACE_BLOCKS):
        if data[b * BS : (b + 1) * BS] != copies.get(b, bytes(BS)):
            if marks[b]:
                pending += 1
            else:
                lost.append(b)
    return lost, pending, rounds


@pytest.fixture
def race_vm(disk_vm, guests):
    ram, (path,) = disk_vm("race", 1 << 20, (RACE_BLOCKS * BS,))
    guests(ram, RACE_SPEC, seed=0x5EED, start=Cmd.RUN)
    pause_disk_io(ram.ctl)
    with DiskImage.open(path, readonly=True) as img, DiskMap.attach(ram.name, 0) as dm:
        yield ram, img, dm.collector()


def test_disk_collect_never_loses_a_write(race_vm):
    ram, img, col = race_vm
    copies = {}
    total_rounds = total_pending = 0
    for _ in range(4):
        lost, pending, rounds = disk_race_cycle(ram, img, col, copies, collect_right)
        print(f"disk collect: {rounds} rounds, {pending} blocks pending, {len(lost)} lost")
        assert lost == [], f"writes to {len(lost)} blocks lost, e.g. {lost[:10]}"
        total_rounds += rounds
        total_pending += pending
    assert total_rounds >= 50
    assert total_pending > 0          # writes after the last collection were found marked
    collect_right(col, img, copies)   # paused: one more collect makes the copy exact
    data = img.read_blocks(0, RACE_BLOCKS)
    assert all(data[b * BS : (b + 1) * BS] == copies.get(b, bytes(BS)) for b in range(RACE_BLOCKS))


@pytest.mark.parametrize("collector", [collect_bulk_clear, collect_read_then_bulk_clear],
                         ids=["snapshot-clear_all-read", "snapshot-read-clear_all"])
def test_disk_harness_catches_a_collector_that_loses_writes(race_vm, collector):
    ram, img, col = race_vm
    copies, found = {}, []
    for _ in range(10):     # bounded; usually the first cycle loses some
        lost, _, rounds = disk_race_cycle(ram, img, col, copies, collector)
        found += lost
        print(f"wrong disk collector: {len(lost)} blocks lost in {rounds} rounds")
        if found:
            break
    assert found, "the wrong collector lost nothing: the harness cannot detect lost writes"


def test_paused_guest_obeys_disk_commands_and_takes_a_new_disk_on_resume(make_ram, guests, tmp_path):
    ram = make_ram("hot", 1 << 20)
    guests(ram, "idle:io=1000", seed=4, start=Cmd.PAUSE)
    assert ram.ctl.guest_state is GuestState.PAUSED
    pause_disk_io(ram.ctl)                       # acknowledged by a RAM-paused guest
    assert ram.ctl.disk_io_state is DiskIoState.PAUSED
    resume_disk_io(ram.ctl)
    path = str(tmp_path / "hot.img")
    DiskImage.create(path, 1 << 20).close()
    add_disk(ram, path)                          # allowed while paused: opened on resume
    command(ram, Cmd.RUN)
    wait_for(lambda: ram.ctl.io_writes >= 20, what="writes to the disk added while paused")
    command(ram, Cmd.PAUSE)
    assert {(0, b): k for b, (k, _) in headers(path).items()} == \
        replay("idle:io=1000", (1 << 20,), 4, 1, ram.ctl.io_writes)
