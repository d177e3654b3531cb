"""The disk mirror: copy a VM disk while its guest writes it, converge, verify.

QEMU's block mirror in livemig's terms (see ../shared/research/storage-anchors.md
§1 and §9). One mirror per disk (:class:`DiskMirror`), all disks of one
move driven together by :class:`MirrorSet` in one copier thread (the
driver, agent/migration/storage.py, calls its steps through
``asyncio.to_thread``; the event loop never blocks on a disk).

Parts::

    DiskMirror  the disk as the VM writes it: our own read-only fd of the image,
                its dirty-block map (memstore.disk: the guest pwrites W, then marks M),
                the bulk list, per-block digests of what was read (src) and of
                what the target holds, read back (dst)
    BlockSink   where blocks land (write / punch / flush / read-back digests /
                data extents). LocalSink = a staging file on this host: the
                storage move's target, and what the destination half of a
                network migration writes into (IncomingDiskSection, below)
    MirrorSet   the steps of one move over all its disks: start_tracking, bulk,
                converge (dirty rounds, then the synchronous phase), prepare_switch

The steps, in order (the order is the correctness argument):

1. **Track before the scan** (``start_tracking``): collect-and-discard the
   dirty map, fdatasync the source, then scan its data extents with
   SEEK_DATA/SEEK_HOLE. A write whose mark was discarded had its data in
   the file before the discard, so before the scan and the bulk read; a
   write after it leaves a mark. Holes are never read or written: the copy
   starts as a sparse file and stays one (an all-zero data block is not
   written either, so the copy is never larger than the source's
   allocation plus what the guest wrote meanwhile).
2. **Bulk pass** (``bulk``): the data extents in 1 MiB chunks; each block's
   digest is taken from the bytes read (``src``).
3. **Dirty rounds** (``converge``): collect, copy, read back, until what is
   dirty fits the switch budget. Collect (S, C) happens before the read (R),
   as memstore/dirtymap.py proves safe.
4. **Synchronous phase** when the dirty set stops shrinking (two rounds
   without shrinking by 10 %, or MAX_ROUNDS): the copier alternates a
   *held* window (the guest's disk IO paused, copying the dirty set for at
   most hold_s: no new dirt can appear) with a *free* window (IO runs, the
   copier goes on). Each time the dirty set did not shrink over a cycle the
   free window halves (down to MIN_FREE_S), then the held window doubles
   (HOLD_S up to MAX_HOLD_S), so the share of time the guest may dirty
   blocks falls until the copier outruns it: the copy converges whatever
   the write rate (the dirty set is bounded by the guest's working set),
   and no guest write waits longer than one held window. Why not copy-on-write-through (QEMU write-blocking): the guest
   would have to wait for our acknowledgement inside its pwrite path, a
   second channel in memstore; pausing the existing, acknowledged disk-IO
   channel gets the same bound (the guest cannot dirty faster than we copy)
   with the cost visible and measured (``guest_write_wait``).
5. **Read-back verification** after every pass: the sink is fdatasynced,
   then read through a fresh fd after POSIX_FADV_DONTNEED, and each block's
   digest compared with the digest of what was read from the source. A
   mismatch puts the block back in the dirty set (recopied, counted); a
   block that mismatches MAX_BLOCK_MISMATCHES times fails the move.
6. **Switch** (``prepare_switch``): pause the disk IO (acknowledged: no
   write in flight), final collect and copy (about nothing), read back what
   it wrote, check that the target holds data only where we wrote and that
   every block's src digest equals its read-back dst digest; flush. Any
   failure resumes the IO on the source and raises; the caller never
   switches to a copy that did not pass. (The SEEK_DATA walk of each whole
   target, ``check_extents``, runs just before the pause, when the mirror
   has converged: on a 1 GiB tmpfs file it alone takes ~30 ms.)

Digests are per 64 KiB block (xxh3-128): the unit the dirty map tracks, so
the switch re-reads only the blocks copied since their last read-back, not
whole 1 MiB chunks. ``chunk_digests`` folds them into 1 MiB chunk digests
for the wire (a network migration's Digests frame).

The network mode (next issue) reuses DiskMirror and MirrorSet unchanged
with another sink: :class:`BlockSink` is the seam. See ``IncomingDiskSection``
for the destination half (a LocalSink fed from PageBatch frames whose runs
are in 4 KiB pages: block b = pages [16 b, 16 b + 16)).

Test hook: ``LIVEMIG_FAULT_INJECT=corrupt-disk-copy`` in the agent's
environment flips byte 8 of the last data block the bulk pass wrote, once,
in the target file (after the write, as a storage fault would);
``corrupt-disk-copy-always`` does it after every write of that block.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import xxhash

from memstore import (BLOCK_SIZE, ControlBlock, DiskError, DiskImage, DiskMap, PageRun, pause_disk_io,
                      resume_disk_io)
from memstore.control import DiskIoState

from agent.errors import AgentError

DIGEST_BYTES = 16
CHUNK_BLOCKS = 16                  # 1 MiB per read and write with 64 KiB blocks
ZERO_BLOCK_DIGEST = xxhash.xxh3_128_digest(bytes(BLOCK_SIZE))
SHRINK_FACTOR = 0.9                # a round "shrinks" if it leaves < 90 % of the previous dirty set
STALL_ROUNDS = 2                   # rounds without shrinking before the synchronous phase
MAX_ROUNDS = 30                    # dirty rounds before the synchronous phase at the latest
HOLD_S = 0.02                      # first held window (guest disk IO paused) of the synchronous phase
MAX_HOLD_S = 0.2                   # longest held window: no guest write waits longer (plus the ack)
MIN_FREE_S = 0.001                 # shortest free window between two held ones
SWITCH_BUDGET_S = 0.01             # the final round's copy (and read-back) should fit this
MIN_SWITCH_BLOCKS = 16
MAX_SWITCH_BLOCKS = 1024
MAX_BLOCK_MISMATCHES = 3           # the same block read back wrong this often: fail, do not loop
IO_TIMEOUT_S = 5.0                 # the guest must acknowledge a disk IO command within this

FAULTS = frozenset(p.strip() for p in os.environ.get("LIVEMIG_FAULT_INJECT", "").split(",") if p.strip())


class MirrorError(AgentError):
    """The mirror cannot go on (the source stays as it is)."""


class VerifyFailed(MirrorError):
    """The copy does not hold what was read from the source."""


class MirrorCancelled(MirrorError):
    """The move was cancelled; the copier stopped at a safe point."""


def block_digest(view) -> bytes:
    return xxhash.xxh3_128_digest(view)


def chunk_digests(block_digests: bytes | bytearray, chunk_blocks: int = CHUNK_BLOCKS) -> bytes:
    """Fold per-block digests into per-chunk digests (xxh3-128 of the chunk's
    block digests): the list a network migration's Digests frame carries."""
    step = chunk_blocks * DIGEST_BYTES
    view = memoryview(block_digests)
    return b"".join(xxhash.xxh3_128_digest(view[off:off + step]) for off in range(0, len(view), step))


def block_runs(blocks: Sequence[int], max_count: int = CHUNK_BLOCKS) -> list[PageRun]:
    """Sorted block numbers -> runs of consecutive blocks, each at most ``max_count``."""
    runs: list[PageRun] = []
    for b in blocks:
        if runs and runs[-1].end == b and runs[-1].count < max_count:
            runs[-1] = PageRun(runs[-1].first, runs[-1].count + 1)
        else:
            runs.append(PageRun(b, 1))
    return runs


def split_runs(runs: Sequence[PageRun], max_count: int = CHUNK_BLOCKS) -> list[PageRun]:
    out = []
    for first, count in runs:
        while count > 0:
            n = min(count, max_count)
            out.append(PageRun(first, n))
            first, count = first + n, count - n
    return out


# ---------------------------------------------------------------------------
# where blocks land


class BlockSink(Protocol):
    """The target half of a mirror (one disk)."""

    path: str

    def write(self, first: int, data: memoryview) -> None: ...
    def punch(self, first: int, count: int) -> None: ...
    def flush(self) -> None: ...
    def read_digests(self, blocks: Sequence[int]) -> list[bytes]: ...
    def data_blocks(self) -> list[PageRun]: ...
    def allocated_bytes(self) -> int: ...
    def close(self) -> None: ...


class LocalSink:
    """A new sparse image file on this host (created exclusively, mode 0600),
    written with pwrite; read back through a fresh fd after fdatasync and
    POSIX_FADV_DONTNEED, so verification sees what the file holds, not the
    copier's buffers."""

    def __init__(self, path: str, size_bytes: int, block_size: int = BLOCK_SIZE) -> None:
        self.path = path
        self.img = DiskImage.create(path, size_bytes, block_size=block_size)
        self.block_size = block_size
        self.identity = self.img.identity()
        self.fault_block: int | None = None      # test hook (LIVEMIG_FAULT_INJECT)
        self.fault_always = False
        self.faults_injected = 0

    def write(self, first: int, data: memoryview) -> None:
        self.img.write_blocks(first, data)
        fb = self.fault_block
        if fb is not None and first <= fb < first + len(data) // self.block_size:
            if self.fault_always or not self.faults_injected:
                off = fb * self.block_size + 8
                byte = data[(fb - first) * self.block_size + 8]
                os.pwrite(self.img.fd, bytes([byte ^ 0xFF]), off)
                self.faults_injected += 1

    def punch(self, first: int, count: int) -> None:
        self.img.punch_blocks(first, count)

    def flush(self) -> None:
        self.img.fdatasync()

    def read_digests(self, blocks: Sequence[int]) -> list[bytes]:
        """Digests of ``blocks`` (sorted) as the file holds them, read back."""
        if not blocks:
            return []
        self.flush()                             # DONTNEED drops only clean pages
        bs = self.block_size
        out: list[bytes] = []
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_ino != self.identity[1]:
                raise VerifyFailed(f"{self.path} is no longer the file the copy was written to")
            buf = bytearray(CHUNK_BLOCKS * bs)
            view = memoryview(buf)
            for first, count in block_runs(blocks):
                off, length = first * bs, count * bs
                os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)
                got = 0
                while got < length:
                    n = os.preadv(fd, [view[got:length]], off + got)
                    if n == 0:
                        view[got:length] = bytes(length - got)
                        break
                    got += n
                for i in range(count):
                    out.append(block_digest(view[i * bs:(i + 1) * bs]))
        except OSError as exc:
            raise DiskError(f"read-back of {self.path}: {exc}", errno=exc.errno) from exc
        finally:
            os.close(fd)
        return out

    def data_blocks(self) -> list[PageRun]:
        return self.img.data_blocks()

    def allocated_bytes(self) -> int:
        return self.img.allocated_bytes()

    def close(self) -> None:
        self.img.close()


# ---------------------------------------------------------------------------
# one disk


@dataclass
class DiskCounters:
    bytes_copied: int = 0          # bytes written to the target (all passes)
    blocks_copied: int = 0
    zero_blocks: int = 0           # data-extent blocks that read as zeros: not written (holes stay holes)
    blocks_verified: int = 0
    mismatches: int = 0            # blocks read back wrong (and recopied)


class DiskMirror:
    """Mirror state of one disk (see the module docstring). Not thread-safe:
    one copier thread drives it; others only read the counters."""

    def __init__(self, index: int, name: str, segment: str, source_path: str, sink: BlockSink) -> None:
        self.index = index
        self.name = name
        self.sink = sink
        self.map = DiskMap.attach(segment, index)
        try:
            self.bs = self.map.block_size
            self.src = DiskImage.open(source_path, readonly=True, block_size=self.bs)
        except BaseException:
            self.map.close()
            raise
        self.nblocks = self.map.nblocks
        self.collector = self.map.collector()
        self.src_digest = bytearray(ZERO_BLOCK_DIGEST * self.nblocks)
        self.dst_digest = bytearray(ZERO_BLOCK_DIGEST * self.nblocks)
        self.written = bytearray(self.nblocks)      # 1: the last thing done to the target block was a data write
        self.unverified: set[int] = set()
        self.pending: set[int] = set()
        self.bad: dict[int, int] = {}
        self.bulk: list[PageRun] = []
        self.bulk_pos = 0
        self.c = DiskCounters()
        self._buf = bytearray(CHUNK_BLOCKS * self.bs)
        self._view = memoryview(self._buf)
        self.allocated_before = self.src.allocated_bytes()

    # ---- bookkeeping ---------------------------------------------------------
    @property
    def bulk_blocks_left(self) -> int:
        return sum(r.count for r in self.bulk[self.bulk_pos:])

    def remaining_bytes(self) -> int:
        return (self.bulk_blocks_left + len(self.pending)) * self.bs

    def start_tracking(self) -> None:
        """Discard the marks, flush the source, then scan its data (step 1)."""
        self.collector.collect()
        self.src.fdatasync()
        self.bulk = split_runs(self.src.data_blocks())
        self.bulk_pos = 0
        if "corrupt-disk-copy" in FAULTS or "corrupt-disk-copy-always" in FAULTS:
            if self.index == 0 and self.bulk and isinstance(self.sink, LocalSink):
                self.sink.fault_block = self.bulk[-1].end - 1
                self.sink.fault_always = "corrupt-disk-copy-always" in FAULTS

    def collect(self) -> int:
        """Dirty blocks since the last collect join the pending set; returns how many."""
        n = 0
        for first, count in self.collector.collect():
            self.pending.update(range(first, first + count))
            n += count
        return n

    # ---- copying ---------------------------------------------------------------
    def copy_run(self, first: int, count: int) -> int:
        """Read blocks [first, first+count) from the source, write them to the
        target (zero blocks become holes). Returns bytes read."""
        bs = self.bs
        view = self._view[:count * bs]
        self.src.readinto_blocks(first, view)
        sink, written, src_digest = self.sink, self.written, self.src_digest
        run_start = None
        zero_start = None

        def flush_data(end: int) -> None:
            nonlocal run_start
            if run_start is not None:
                sink.write(first + run_start, view[run_start * bs:end * bs])
                self.c.bytes_copied += (end - run_start) * bs
                self.c.blocks_copied += end - run_start
                run_start = None

        def flush_zero(end: int) -> None:
            nonlocal zero_start
            if zero_start is not None:
                sink.punch(first + zero_start, end - zero_start)
                zero_start = None

        for i in range(count):
            b = first + i
            d = block_digest(view[i * bs:(i + 1) * bs])
            src_digest[b * DIGEST_BYTES:(b + 1) * DIGEST_BYTES] = d
            if d == ZERO_BLOCK_DIGEST:
                flush_data(i)
                self.c.zero_blocks += 1
                if written[b]:                    # it held data: make it a hole again
                    if zero_start is None:
                        zero_start = i
                    written[b] = 0
                    self.unverified.add(b)
                else:
                    flush_zero(i)
            else:
                flush_zero(i)
                if run_start is None:
                    run_start = i
                written[b] = 1
                self.unverified.add(b)
        flush_data(count)
        flush_zero(count)
        return count * bs

    def take_pending(self, max_blocks: int | None = None) -> list[PageRun]:
        """Runs of pending blocks to copy now (removed from the pending set)."""
        blocks = sorted(self.pending)
        if max_blocks is not None:
            blocks = blocks[:max_blocks]
        self.pending.difference_update(blocks)
        return block_runs(blocks)

    # ---- verification ----------------------------------------------------------
    def verify(self) -> int:
        """Read back every block written since its last read-back and compare;
        a wrong one goes back to the pending set. Returns the mismatches."""
        if not self.unverified:
            return 0
        blocks = sorted(self.unverified)
        self.unverified.clear()
        digests = self.sink.read_digests(blocks)
        bad = 0
        src, dst = self.src_digest, self.dst_digest
        for b, d in zip(blocks, digests):
            lo, hi = b * DIGEST_BYTES, (b + 1) * DIGEST_BYTES
            dst[lo:hi] = d
            if src[lo:hi] != d:
                bad += 1
                n = self.bad[b] = self.bad.get(b, 0) + 1
                if n >= MAX_BLOCK_MISMATCHES:
                    raise VerifyFailed(f"disk {self.name}: block {b} of the copy {self.sink.path} was read back "
                                       f"wrong {n} times in a row; the copy is not trustworthy")
                self.pending.add(b)
        self.c.blocks_verified += len(blocks)
        self.c.mismatches += bad
        return bad

    def check_extents(self) -> None:
        """The target holds data only in blocks the copier wrote (an offset bug
        or a stray writer would put it elsewhere). A SEEK_DATA walk of the
        whole target: run once the mirror is converged, before the pause
        (the final round only writes blocks it knows, and reads them back)."""
        written = self.written
        for first, count in self.sink.data_blocks():
            if written[first:first + count].count(0):
                b = first + written[first:first + count].index(0)
                raise VerifyFailed(f"disk {self.name}: the copy {self.sink.path} holds data in block {b}, "
                                   f"which the copier never wrote")

    def final_check(self) -> None:
        """With the guest's disk IO paused and everything copied and read back:
        every block's read-back digest equals the digest of what was read
        from the source (and nothing is left to copy or to read back)."""
        if self.pending or self.unverified:
            raise VerifyFailed(f"disk {self.name}: {len(self.pending)} blocks still to copy and "
                               f"{len(self.unverified)} unverified at the switch")
        if self.src_digest != self.dst_digest:
            view_s, view_d = memoryview(self.src_digest), memoryview(self.dst_digest)
            first_bad = next(b for b in range(self.nblocks)
                             if view_s[b * DIGEST_BYTES:(b + 1) * DIGEST_BYTES]
                             != view_d[b * DIGEST_BYTES:(b + 1) * DIGEST_BYTES])
            raise VerifyFailed(f"disk {self.name}: block {first_bad} of the copy {self.sink.path} differs "
                               f"from the source")

    def close(self) -> None:
        self._view.release()
        self.src.close()
        self.collector = None
        self.map.close()


# ---------------------------------------------------------------------------
# all disks of one move


class Pacer:
    """A bandwidth cap for the copier thread (0 = none): virtual-time pacing
    with a 10 ms burst, as agent.migration.scheduler.HostBandwidth."""

    BURST_S = 0.01

    def __init__(self, bps: int, cancel: threading.Event) -> None:
        self.bps = bps
        self.cancel = cancel
        self._next = 0.0

    def consume(self, nbytes: int) -> None:
        if not self.bps:
            return
        now = time.monotonic()
        self._next = max(self._next, now - self.BURST_S) + nbytes / self.bps
        delay = self._next - now
        if delay > 0:
            self.cancel.wait(delay)


@dataclass
class RoundLog:
    round: int
    kind: str                      # "bulk" | "dirty" | "sync" | "final"
    blocks: int
    bytes: int
    ms: float
    dirty_after: int
    held_ms: float = 0.0
    mismatches: int = 0

    def as_dict(self) -> dict:
        return {"round": self.round, "kind": self.kind, "blocks": self.blocks, "bytes": self.bytes,
                "ms": round(self.ms, 2), "dirty_after": self.dirty_after, "held_ms": round(self.held_ms, 2),
                "mismatches": self.mismatches}


class MirrorSet:
    """The copier of one move: every step runs in the caller's (worker) thread.

    ``ctl`` is the VM's control block (the disk IO channel); ``cancel`` is
    checked between chunks, so a cancel stops the copier within ~a chunk;
    a held window always ends with the IO resumed.
    """

    def __init__(self, disks: list[DiskMirror], ctl: ControlBlock, *, bandwidth_bps: int = 0,
                 cancel: threading.Event | None = None) -> None:
        self.disks = disks
        self.ctl = ctl
        self.cancel = cancel or threading.Event()
        self.pacer = Pacer(bandwidth_bps, self.cancel)
        self.rounds: list[RoundLog] = []
        self.mode = "bulk"
        self.copy_bps = 0.0               # measured by the bulk pass
        self.held: list[float] = []       # held windows of the synchronous phase, ms
        self.io_paused_at: float | None = None
        self.switch_pause_started = 0.0
        self.switch_ms: dict[str, float] = {}    # where the switch's IO pause went
        self.round_bps = 0.0                      # copy + read-back rate of the last dirty round

    # ---- helpers ---------------------------------------------------------------
    def _check(self) -> None:
        if self.cancel.is_set():
            raise MirrorCancelled("cancelled")

    @property
    def pending_blocks(self) -> int:
        return sum(len(d.pending) for d in self.disks)

    def remaining_bytes(self) -> int:
        return sum(d.remaining_bytes() for d in self.disks)

    @property
    def bytes_copied(self) -> int:
        return sum(d.c.bytes_copied for d in self.disks)

    @property
    def mismatches(self) -> int:
        return sum(d.c.mismatches for d in self.disks)

    def collect(self) -> int:
        return sum(d.collect() for d in self.disks)

    def verify(self) -> int:
        return sum(d.verify() for d in self.disks)

    def copy_pending(self, deadline: float | None = None) -> tuple[int, int]:
        """Copy pending blocks, chunk by chunk, until none is left or the deadline passes."""
        blocks = nbytes = 0
        for d in self.disks:
            while d.pending:
                self._check()
                if deadline is not None and time.monotonic() >= deadline:
                    return blocks, nbytes
                for first, count in d.take_pending(CHUNK_BLOCKS * 4):
                    n = d.copy_run(first, count)
                    self.pacer.consume(n)
                    blocks, nbytes = blocks + count, nbytes + n
        return blocks, nbytes

    def switch_blocks(self) -> int:
        """How many dirty blocks the final round may take (it runs with the IO paused)."""
        bs = self.disks[0].bs if self.disks else BLOCK_SIZE
        rate = self.copy_bps or 200 * 2**20
        if self.round_bps:                        # scattered dirty blocks copy slower than the bulk
            rate = min(rate, self.round_bps)
        if self.pacer.bps:
            rate = min(rate, self.pacer.bps)
        n = int(rate * SWITCH_BUDGET_S / 2 / bs)      # copy + read-back
        return max(MIN_SWITCH_BLOCKS, min(MAX_SWITCH_BLOCKS, n))

    def pause_io(self) -> None:
        pause_disk_io(self.ctl, IO_TIMEOUT_S)
        self.io_paused_at = time.monotonic()

    def resume_io(self) -> None:
        if self.io_paused_at is not None:
            resume_disk_io(self.ctl, IO_TIMEOUT_S)
            self.io_paused_at = None

    # ---- steps -------------------------------------------------------------------
    def start_tracking(self) -> None:
        for d in self.disks:
            d.start_tracking()

    def bulk(self, max_blocks: int | None = None) -> bool:
        """Copy the bulk list (every disk, in order); with ``max_blocks``, stop
        after about that many. True once the whole list is copied."""
        t0 = time.monotonic()
        done_blocks = done_bytes = 0
        for d in self.disks:
            while d.bulk_pos < len(d.bulk):
                self._check()
                if max_blocks is not None and done_blocks >= max_blocks:
                    self._log_bulk(t0, done_blocks, done_bytes)
                    return False
                first, count = d.bulk[d.bulk_pos]
                n = d.copy_run(first, count)
                d.bulk_pos += 1
                self.pacer.consume(n)
                done_blocks, done_bytes = done_blocks + count, done_bytes + n
        self._log_bulk(t0, done_blocks, done_bytes)
        self.verify()
        return True

    def _log_bulk(self, t0: float, blocks: int, nbytes: int) -> None:
        dt = time.monotonic() - t0
        if nbytes and dt > 0:
            self.copy_bps = max(self.copy_bps, nbytes / dt) if self.copy_bps else nbytes / dt
        self.rounds.append(RoundLog(len(self.rounds) + 1, "bulk", blocks, nbytes, dt * 1000.0,
                                    self.pending_blocks))

    def converge(self) -> None:
        """Dirty rounds, then (if they stop shrinking) the synchronous phase;
        returns when the dirty set fits the switch budget."""
        self.mode = "rounds"
        last: int | None = None
        stalled = 0
        rounds = 0
        while True:
            self._check()
            self.collect()
            pend = self.pending_blocks
            if pend <= self.switch_blocks():
                self.verify()                     # recopies land in pending: look again
                if self.pending_blocks <= self.switch_blocks():
                    self.check_extents()
                    return
                continue
            if last is not None:
                stalled = stalled + 1 if pend > last * SHRINK_FACTOR else 0
            if stalled >= STALL_ROUNDS or rounds >= MAX_ROUNDS:
                break
            last = pend
            rounds += 1
            t0 = time.monotonic()
            blocks, nbytes = self.copy_pending()
            bad = self.verify()
            dt = time.monotonic() - t0
            if nbytes >= 16 * bs_of(self) and dt > 0:
                self.round_bps = nbytes / dt
            self.rounds.append(RoundLog(len(self.rounds) + 1, "dirty", blocks, nbytes,
                                        (time.monotonic() - t0) * 1000.0, self.collect() + self.pending_blocks,
                                        mismatches=bad))
        self._synchronous()

    def _synchronous(self) -> None:
        """Held windows (IO paused, copying for at most hold_s) alternating with
        free windows: while the dirty set does not shrink over a cycle, the
        free window halves down to MIN_FREE_S, then the held window doubles up
        to MAX_HOLD_S (module doc, step 4)."""
        self.mode = "sync"
        free_s, hold_s = HOLD_S, HOLD_S
        last: int | None = None
        while True:
            self._check()
            t0 = time.monotonic()
            self.pause_io()
            try:
                self.collect()
                blocks, nbytes = self.copy_pending(deadline=time.monotonic() + hold_s)
            finally:
                self.resume_io()
            held_ms = (time.monotonic() - t0) * 1000.0
            self.held.append(held_ms)
            bad = self.verify()
            self.collect()
            pend = self.pending_blocks
            self.rounds.append(RoundLog(len(self.rounds) + 1, "sync", blocks, nbytes, held_ms, pend,
                                        held_ms=held_ms, mismatches=bad))
            if pend <= self.switch_blocks():
                self.check_extents()
                return
            if last is not None and pend >= last:
                if free_s > MIN_FREE_S:
                    free_s = max(MIN_FREE_S, free_s / 2)
                else:
                    hold_s = min(MAX_HOLD_S, hold_s * 2)
            last = pend
            self.copy_pending(deadline=time.monotonic() + free_s)

    def prepare_switch(self) -> RoundLog:
        """Catch up (unpaused: the driver's steps since converge() let some
        dirt in), then pause the disk IO and make every target equal to its
        source, proven by read-back. Returns with the IO paused (the caller
        reopens and resumes); on any error the IO is resumed here and the
        error raised."""
        for _ in range(3):                        # catch up on what the steps since converge() let in
            self._check()
            self.collect()
            self.copy_pending()
            self.verify()
            if self.pending_blocks <= self.switch_blocks() // 4:
                break
        t0 = time.monotonic()
        self.switch_pause_started = t0
        self.pause_io()
        try:
            t1 = time.monotonic()
            self.collect()
            blocks, nbytes = self.copy_pending()
            t2 = time.monotonic()
            bad = self.verify()
            for _ in range(MAX_BLOCK_MISMATCHES):
                if not self.pending_blocks:
                    break
                b2, n2 = self.copy_pending()
                blocks, nbytes = blocks + b2, nbytes + n2
                bad += self.verify()
            for d in self.disks:
                d.final_check()
                d.sink.flush()
            t3 = time.monotonic()
            self.switch_ms = {"pause_ack": (t1 - t0) * 1000.0, "final_copy": (t2 - t1) * 1000.0,
                              "verify": (t3 - t2) * 1000.0}
            log = RoundLog(len(self.rounds) + 1, "final", blocks, nbytes, (time.monotonic() - t0) * 1000.0, 0,
                           mismatches=bad)
            self.rounds.append(log)
            return log
        except BaseException:
            self.resume_io()
            raise

    def check_extents(self) -> None:
        for d in self.disks:
            d.check_extents()

    def close(self) -> None:
        for d in self.disks:
            d.close()


def bs_of(ms: MirrorSet) -> int:
    return ms.disks[0].bs if ms.disks else BLOCK_SIZE


def io_paused(ctl: ControlBlock) -> bool:
    return ctl.disk_io_state is DiskIoState.PAUSED


# ---------------------------------------------------------------------------
# the guest's disk write wait, measured


class WriteWaitMeter:
    """Samples the guest's disk write counter every ~1 ms in its own thread
    and records, each time it advanced, how long it had not: the time a due
    write waited (for a held window, for the CPU, for a slow pwrite), at
    ~1 ms resolution. ``mark(phase)`` tags the samples that follow."""

    PERIOD_S = 0.001

    def __init__(self, read_counter: Callable[[], int]) -> None:
        self.read = read_counter
        self.samples: dict[str, list[float]] = {}
        self.phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="io-wait-meter", daemon=True)

    def start(self) -> "WriteWaitMeter":
        self._thread.start()
        return self

    def mark(self, phase: str) -> None:
        self.phase = phase

    def _run(self) -> None:
        try:
            last_v = self.read()
        except Exception:
            return
        last_t = time.monotonic()
        while not self._stop.wait(self.PERIOD_S):
            try:
                v = self.read()
            except Exception:
                return
            now = time.monotonic()
            if v != last_v:
                self.samples.setdefault(self.phase, []).append((now - last_t) * 1000.0)
                last_v, last_t = v, now

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(1.0)

    def summary(self, phases: Sequence[str] | None = None) -> dict:
        vals = sorted(v for p, s in self.samples.items() if phases is None or p in phases for v in s)
        if not vals:
            return {"p99_ms": None, "max_ms": None, "samples": 0}
        p99 = vals[min(len(vals) - 1, int(len(vals) * 0.99))]
        return {"p99_ms": round(p99, 2), "max_ms": round(vals[-1], 2), "samples": len(vals)}
