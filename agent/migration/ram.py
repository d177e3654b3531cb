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
from typing import Iterator

from memstore import PAGE_SIZE, DirtyMap, PageRun, split_zero
from protocol import MAX_BATCH_RUNS, BatchFlags, ErrorCode, PageBatch, RemoteProtocolError

from agent.migration.section import IncomingSection, OutgoingSection
from agent.migration.verify import ChunkDigests, digest_chunk_pages

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


def populated_runs(ram, chunk_pages: int) -> list[tuple[int, int]]:
    """Chunks of the segment that hold data (SEEK_DATA), merged into runs, so
    the destination pre-faults only memory that will receive pages. Falls
    back to everything when the runs would not fit one Prepare."""
    npages = ram.npages
    runs: list[tuple[int, int]] = []
    page = 0
    while page < npages:
        data = ram.next_data_page(page)
        if data >= npages:
            break
        start = data - data % chunk_pages
        end = min(npages, start + chunk_pages)
        append_run(runs, start, end - start)
        page = end
    if len(runs) > MAX_BATCH_RUNS:
        return [(0, npages)]
    return runs


class _Digested:
    """Both halves keep their memory's digests in ``self.digest`` (verify.py)."""

    digest: ChunkDigests

    async def settle(self) -> None:
        await self.digest.drain()

    async def digests(self, mode: str) -> tuple[int, bytes]:
        return self.digest.chunk_pages, await self.digest.finish(mode)

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
        self._round = 0
        self._unsent_full = self.ram.npages   # pages of the full pass not yet sent (progress)
        self.dirty.collect()                   # start tracking now: round 1 sends every page

    def setup_info(self) -> dict:
        return {"populated": populated_runs(self.ram, self.vm.heat.chunk_pages)}

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
        order = heat.order() if heat.samples else range(heat.nchunks)
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



class RamIn(_Digested, IncomingSection):
    NAME = "ram"

    def __init__(self, vm, host) -> None:
        self.vm = vm
        self.host = host
        self.ram = vm.ram
        self.digest = ChunkDigests(self.ram.ram, digest_chunk_pages(self.ram.npages),
                                   self.ram.next_data_page, self.ram.next_hole_page, fresh_zero=True)
        self.pages_received = 0

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
        # One pre-fault at a time per host: two in parallel contend for the
        # same cores and page allocator; one overlaps another's transfer.
        async with self.host.prefault_lock:
            await asyncio.to_thread(self.ram.prefault, tuple(checked))

    def payload_sink(self, batch: PageBatch):
        npages = self.ram.npages
        ram = self.ram.ram
        for first, count in batch.runs:          # all checked before any view exists
            if first + count > npages:
                raise RemoteProtocolError(f"pages {first}+{count} beyond the VM's {npages} pages", ErrorCode.MALFORMED)
        return [ram[first * PAGE_SIZE:(first + count) * PAGE_SIZE] for first, count in batch.runs]

    def on_batch(self, batch: PageBatch) -> None:
        if batch.flags & BatchFlags.ZERO:
            self._zero(batch)
            return
        self.pages_received += batch.pages
        self.digest.mark(batch.runs)              # exactly the views payload_sink handed out

    def _zero(self, batch: PageBatch) -> None:
        ram = self.ram
        for first, count in batch.runs:
            if first + count > ram.npages:
                raise RemoteProtocolError(f"zero pages {first}+{count} beyond the VM", ErrorCode.MALFORMED)
        if batch.round == 1:
            return                   # a fresh shell is zero already; round 1 sends each page once
        for first, count in batch.runs:
            for a in range(first, first + count, 64):
                n = min(64, first + count - a)
                ram.ram[a * PAGE_SIZE:(a + n) * PAGE_SIZE] = _ZERO[: n * PAGE_SIZE]
        self.digest.mark(batch.runs)              # after the bytes changed

