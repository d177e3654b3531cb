"""The RAM section: guest memory, pre-copied in rounds over the dirty map.

Outgoing (source):
- round 1 = every page, in 4 MiB chunks, coldest chunk first (heat.py); a
  chunk that is a hole of the segment (never written) is found with
  SEEK_DATA and announced as zero without being read; other chunks are
  scanned and their zero granules announced, not sent;
- round n > 1 = the pages a dirty collect returned since the previous one;
- complete() = the last collect with the guest paused, sent at once.
Digests are kept incrementally (verify.py): a chunk is marked when round 1
sends it and when a collect returns a page in it.

Incoming (destination): pre-faults the chunks the source listed as
populated (one pre-fault at a time per host), hands out views of guest
memory for payloads (zero copy) and marks exactly what it handed out.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Iterator

from memstore import PAGE_SIZE, DirtyMap, PageRun, split_zero
from protocol import MAX_BATCH_RUNS, BatchFlags, ErrorCode, PageBatch, RemoteProtocolError

from agent.migration.section import IncomingSection, OutgoingSection
from agent.net.datastream import STREAM_CHUNK_PAGES
from agent.migration.verify import DIGEST_GROUP, ChunkDigests, digest_chunk_pages, fold_digests

MADV_POPULATE_WRITE = 23        # Linux >= 5.14
BATCH_PAGES = 256               # 1 MiB of payload per batch of dirty pages
FULL_PASS_PAGES = 1024          # 4 MiB per batch in round 1 (contiguous: fewer headers and syscalls)
BATCH_RUNS = 1024
ZERO_BATCH_PAGES = 16384
_ZERO = bytes(64 * PAGE_SIZE)


def batches(runs, max_pages: int = BATCH_PAGES, max_runs: int = BATCH_RUNS):
    """Group page runs into batches of at most max_pages pages and max_runs runs."""
    cur: list[tuple[int, int]] = []
    n = 0
    for first, count in runs:
        while count:
            take = min(count, max_pages - n)
            cur.append((first, take))
            n += take
            first += take
            count -= take
            if n == max_pages or len(cur) == max_runs:
                yield cur
                cur, n = [], 0
    if cur:
        yield cur


def append_run(runs: list[tuple[int, int]], first: int, count: int) -> None:
    """Append a run, merging it into the last one when they touch."""
    if runs and runs[-1][0] + runs[-1][1] == first:
        runs[-1] = (runs[-1][0], runs[-1][1] + count)
    else:
        runs.append((first, count))


def populated_runs(ram, chunk_pages: int, order=None) -> list[tuple[int, int]]:
    """Chunks of the segment that hold data (SEEK_DATA), merged into runs, so
    the destination pre-faults only memory that will receive pages; in
    ``order`` (chunk indexes: the order round 1 sends them) when given, so
    the destination can allocate ahead of the pages. Falls back to
    everything when the runs would not fit one Prepare."""
    npages = ram.npages
    runs: list[tuple[int, int]] = []
    if order is None:
        page = 0
        while page < npages:
            data = ram.next_data_page(page)
            if data >= npages:
                break
            start = data - data % chunk_pages
            end = min(npages, start + chunk_pages)
            append_run(runs, start, end - start)
            page = end
    else:
        for c in order:
            start = c * chunk_pages
            end = min(npages, start + chunk_pages)
            if ram.next_data_page(start) < end:
                append_run(runs, start, end - start)
    if len(runs) > MAX_BATCH_RUNS:
        return [(0, npages)]
    return runs


class AheadFaulter(threading.Thread):
    """The destination's guest memory, allocated while the pages arrive
    (``migration.prefault = "ahead"`` or ``"receive"``).

    A background thread walks the chunks the source listed as populated, in
    the order the source sends them: ``posix_fallocate`` (the space, so no
    write can hit an unbacked page: SIGBUS on a full /dev/shm) and, unless
    ``populate`` is off, MADV_POPULATE_WRITE through ctypes (which releases
    the GIL, unlike mmap.madvise). The receive path calls ``ensure(runs)``
    before it writes: a chunk the thread has not reserved yet (the receive
    overtook it, or the guest wrote a new page during the migration) is
    reserved right there; a full /dev/shm is then a SegmentError of that
    batch, never a signal. With populate off the receive path takes the page
    faults inside recv_into."""

    def __init__(self, ram, runs, chunk_pages: int, populate: bool) -> None:
        super().__init__(name="prefault-ahead", daemon=True)
        self.ram, self.chunk_pages, self.populate = ram, chunk_pages, populate
        self.runs = list(runs)
        self.reserved = bytearray((ram.npages + chunk_pages - 1) // chunk_pages)
        self.stopping = False
        self.failure: BaseException | None = None
        self.chunks_ahead = 0              # reserved by the thread (the rest: by the receive path)
        self._buf = None                   # ctypes view of guest memory while the thread runs

    def mark_reserved(self, runs) -> None:
        cp = self.chunk_pages
        for first, count in runs:
            for c in range(first // cp, (first + count - 1) // cp + 1):
                self.reserved[c] = 1

    def ensure(self, runs) -> None:
        reserved, cp, npages = self.reserved, self.chunk_pages, self.ram.npages
        for first, count in runs:
            for c in range(first // cp, (first + count - 1) // cp + 1):
                if not reserved[c]:
                    start = c * cp
                    self.ram.reserve(((start, min(cp, npages - start)),))
                    reserved[c] = 1

    def run(self) -> None:
        import ctypes

        cp, npages = self.chunk_pages, self.ram.npages
        populate = None
        if self.populate:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                self._buf = (ctypes.c_char * len(self.ram.ram)).from_buffer(self.ram.ram)
                base = ctypes.addressof(self._buf)
                madvise = libc.madvise
                madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

                def populate(first: int, count: int) -> None:
                    if madvise(base + first * PAGE_SIZE, count * PAGE_SIZE, MADV_POPULATE_WRITE) != 0:
                        raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_WRITE)")
            except (OSError, AttributeError, TypeError, ValueError):
                populate = None
        try:
            for first, count in self.runs:
                for start in range(first, first + count, cp):
                    if self.stopping:
                        return
                    n = min(cp, first + count - start, npages - start)
                    c = start // cp
                    if not self.reserved[c]:
                        self.ram.reserve(((c * cp, min(cp, npages - c * cp)),))
                        self.reserved[c] = 1
                        self.chunks_ahead += 1
                    if populate is not None:
                        try:
                            populate(start, n)
                        except OSError:
                            populate = None     # old kernel: the receive path faults the rest in
        except BaseException as exc:  # noqa: BLE001 - the receive path meets the same error itself
            self.failure = exc
        finally:
            self._buf = None

    def stop(self) -> None:
        self.stopping = True


class _Digested:
    """Both halves keep their memory's digests in ``self.digest`` (verify.py)."""

    digest: ChunkDigests

    async def settle(self) -> None:
        await self.digest.drain()

    async def digests(self, mode: str) -> tuple[int, bytes]:
        """Folded (verify.fold_digests): one digest per DIGEST_GROUP chunks;
        both halves fold alike, so the comparison stays exact."""
        full = await self.digest.finish(mode)
        return self.digest.chunk_pages * DIGEST_GROUP, fold_digests(full)

    async def cleanup(self, committed: bool) -> None:
        await asyncio.to_thread(self.digest.close)


class RamOut(_Digested, OutgoingSection):
    NAME = "ram"

    def __init__(self, vm, stream) -> None:
        self.vm = vm
        self.ram = vm.ram
        self.stream = stream               # driver's sender: pages(), zero(), pacing and stats
        self.dirty = DirtyMap(self.ram.dirty)
        self.digest = ChunkDigests(self.ram.ram, digest_chunk_pages(self.ram.npages),
                                   self.ram.next_data_page, self.ram.next_hole_page)
        self._work: Iterator[tuple[str, list]] | None = None
        self._order: list[int] | None = None
        self._round = 0
        self._unsent_full = self.ram.npages   # pages of the full pass not yet sent (progress)
        self.dirty.collect()                   # start tracking now: round 1 sends every page

    def setup_info(self) -> dict:
        # Round 1's order is fixed here, so the destination can allocate in it.
        heat = self.vm.heat
        self._order = heat.order() if heat.samples else list(range(heat.nchunks))
        return {"populated": populated_runs(self.ram, heat.chunk_pages, self._order)}

    # ---- rounds ---------------------------------------------------------
    def begin_round(self, round_no: int) -> None:
        self._round = round_no
        if round_no == 1:
            self._work = self._full_pass()
        else:
            self._work = self._dirty_pass(self._collect())

    def _collect(self) -> list:
        runs = self.dirty.collect()
        self.stream.stats.dirty_syncs += 1
        self.digest.mark(runs)                 # their hashes (if any) read the pages too early
        return runs

    def _dirty_pass(self, runs) -> Iterator[tuple[str, list]]:
        for chunk in batches(tuple(r) for r in runs):
            yield "data", chunk

    def _full_pass(self) -> Iterator[tuple[str, list]]:
        ram, npages = self.ram, self.ram.npages
        heat = self.vm.heat
        order = self._order if self._order is not None else (heat.order() if heat.samples else range(heat.nchunks))
        cp = heat.chunk_pages
        zero: list[tuple[int, int]] = []
        for c in order:
            first = c * cp
            count = min(cp, npages - first)
            if ram.next_data_page(first) >= first + count:          # a hole: never written
                append_run(zero, first, count)
                data_runs = ()
            else:
                data_runs, zero_runs = split_zero(ram.ram, PageRun(first, count))
                for r in zero_runs:
                    append_run(zero, r.first, r.count)
            self.digest.mark(((first, count),))
            if sum(n for _, n in zero) >= ZERO_BATCH_PAGES or len(zero) >= BATCH_RUNS:
                yield "zero", zero
                zero = []
            for chunk in batches(((r.first, r.count) for r in data_runs), FULL_PASS_PAGES, BATCH_RUNS):
                yield "data", chunk
            self._unsent_full -= count
        if zero:
            yield "zero", zero

    async def iterate(self, budget_bytes: int) -> bool:
        sent = 0
        for kind, runs in self._work:
            if kind == "zero":
                await self._send_zero(runs)
            else:
                sent += await self.stream.pages(self, self._round, runs, self.ram.ram)
            if sent >= budget_bytes:
                return False
        return True

    async def _send_zero(self, runs) -> None:
        for chunk in batches(runs, ZERO_BATCH_PAGES, BATCH_RUNS):
            await self.stream.zero(self, self._round, chunk)

    def pending_estimate(self) -> int:
        unsent = self._unsent_full if self._round == 1 else 0
        # During round 1 a page dirtied ahead of the pass is counted twice: never more than all of RAM.
        return min(self.ram.npages, unsent + self.dirty.count()) * PAGE_SIZE

    # ---- the pause --------------------------------------------------------
    async def complete(self) -> None:
        self._round += 1
        self._work = self._dirty_pass(self._collect())
        await self.iterate(1 << 62)



FAULT_CHUNK_PAGES = 1024        # 4 MiB: the unit the destination allocates ahead in


class RamIn(_Digested, IncomingSection):
    NAME = "ram"

    def __init__(self, vm, host) -> None:
        self.vm = vm
        self.host = host
        self.ram = vm.ram
        self.digest = ChunkDigests(self.ram.ram, digest_chunk_pages(self.ram.npages),
                                   self.ram.next_data_page, self.ram.next_hole_page, fresh_zero=True)
        self.pages_received = 0
        self.faulter: AheadFaulter | None = None
        # Digests hashed by the receiving stream's thread (hash_now) when a
        # digest chunk lies inside one stream chunk (it always does below 512 GiB).
        cp = self.digest.chunk_pages
        self.hash_in_stream = cp <= STREAM_CHUNK_PAGES and STREAM_CHUNK_PAGES % cp == 0

    async def setup(self, info: dict) -> None:
        runs = info.get("populated", [])
        if not isinstance(runs, list) or len(runs) > MAX_BATCH_RUNS:
            raise RemoteProtocolError("ram setup: populated must be a list of runs", ErrorCode.MALFORMED)
        npages = self.ram.npages
        checked = []
        for r in runs:
            if (not isinstance(r, list) or len(r) != 2 or not all(type(x) is int for x in r)
                    or r[0] < 0 or r[1] < 1 or r[0] + r[1] > npages):
                raise RemoteProtocolError(f"ram setup: bad populated run {r!r:.60}", ErrorCode.MALFORMED)
            checked.append((r[0], r[1]))
        mode = self.host.cfg.migration.prefault
        self.faulter = AheadFaulter(self.ram, checked, FAULT_CHUNK_PAGES, populate=mode == "ahead")
        if mode == "setup":
            # One pre-fault at a time per host: two in parallel contend for the
            # same cores and page allocator; one overlaps another's transfer.
            async with self.host.prefault_lock:
                await asyncio.to_thread(self.ram.prefault, tuple(checked))
            self.faulter.mark_reserved(checked)
        else:
            self.faulter.start()          # Ready goes out now; memory is allocated as pages arrive

    def payload_sink(self, batch: PageBatch):
        """Views of guest memory for the payload (a data stream's thread)."""
        npages = self.ram.npages
        ram = self.ram.ram
        for first, count in batch.runs:          # all checked before any view exists
            if first + count > npages:
                raise RemoteProtocolError(f"pages {first}+{count} beyond the VM's {npages} pages", ErrorCode.MALFORMED)
        if self.faulter is not None:
            self.faulter.ensure(batch.runs)
        return [ram[first * PAGE_SIZE:(first + count) * PAGE_SIZE] for first, count in batch.runs]

    def apply_in_stream(self, batch: PageBatch) -> None:
        """In the data stream's thread and order (a later copy of the same
        page comes behind it on the same stream): a zero batch's zeros, then
        the digests of what the batch changed, hashed here while the bytes
        are in cache (verify.ChunkDigests.hash_now)."""
        ram = self.ram
        if batch.flags & BatchFlags.ZERO:
            for first, count in batch.runs:
                if first + count > ram.npages:
                    raise RemoteProtocolError(f"zero pages {first}+{count} beyond the VM", ErrorCode.MALFORMED)
            if batch.round == 1:
                return               # a fresh shell is zero already; round 1 sends each page once
            if self.faulter is not None:
                self.faulter.ensure(batch.runs)
            for first, count in batch.runs:
                for a in range(first, first + count, 64):
                    n = min(64, first + count - a)
                    ram.ram[a * PAGE_SIZE:(a + n) * PAGE_SIZE] = _ZERO[: n * PAGE_SIZE]
        if self.hash_in_stream:
            self.digest.hash_now(batch.runs)

    def on_batch(self, batch: PageBatch) -> None:
        """Bookkeeping (loop thread), after the batch's bytes are in place."""
        if not batch.flags & BatchFlags.ZERO:
            self.pages_received += batch.pages
        if not self.hash_in_stream and (batch.round > 1 or not batch.flags & BatchFlags.ZERO):
            self.digest.mark(batch.runs)          # exactly what payload_sink / apply_in_stream changed

    async def cleanup(self, committed: bool) -> None:
        faulter = self.faulter
        if faulter is not None and faulter.ident is not None:
            faulter.stop()
            await asyncio.to_thread(faulter.join)   # it maps guest memory: gone before the segment
        await super().cleanup(committed)

