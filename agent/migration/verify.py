"""Proving memory equal before the destination resumes, without hashing it
all inside the pause.

Both sides keep xxh3-128 digests of a section's memory in chunks of
``digest_chunk_pages(npages)`` pages, computed *during pre-copy* by one
worker thread (xxhash releases the GIL). Every change to a chunk bumps its
generation; a chunk hashed at generation g is stale once a later change
bumps it past g, so ``finish()`` at the pause rehashes only the stale chunks:
after the last round that is a few chunks, not the whole memory.

    marks:    gen[c] += 1, pending.add(c)          (after the bytes changed)
    worker:   g = gen[c]; d = xxh3_128(chunk c); digest[c] = d; hashed[c] = g
    finish(): wait for the worker; rehash every c with hashed[c] != gen[c]

Where the marks come from:

- **source**: a chunk is marked when round 1 sends it and whenever a dirty
  collect returns a page in it. The guest writes a page, then its dirty
  byte; a collect that sees the byte happens after the write, and the mark
  after the collect, so a hash that read the page before the write is
  always stale by the pause (the final collect runs with the guest paused).
- **destination**: the receive sink marks exactly the range it wrote into
  guest memory (the views it handed out), never what a header claims.

``full`` mode (``migration.verify = "full"``) ignores all bookkeeping: at
the pause each side hashes every chunk of its frozen memory (holes of the
segment, found with SEEK_DATA, hash as zeros without being read: reading a
tmpfs hole allocates it). It costs downtime (~0.1 s per GiB here) and
catches a byte changed by anything, not only by the receive path.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Callable

import xxhash

from memstore import PAGE_SIZE, chunk_digests, diff_chunks

MIN_CHUNK_PAGES = 4
MAX_DIGEST_LIST_BYTES = 2 * 2**20
DIGEST_BYTES = 16
DIGEST_GROUP = 256          # chunk digests per folded digest in Digests (fold_digests)
HASH_GROUP = 1024           # chunks whose generations are read together, before their hole lookups


def digest_chunk_pages(npages: int) -> int:
    """Chunk size for a section of ``npages``: as small as possible (less to
    rehash at the pause: the last round's scattered pages each dirty one
    chunk) while the digest list stays within one Digests frame."""
    cp = MIN_CHUNK_PAGES
    while (npages + cp - 1) // cp * DIGEST_BYTES > MAX_DIGEST_LIST_BYTES:
        cp *= 2
    return cp


async def _wait(fut: concurrent.futures.Future) -> None:
    """Wait for the worker's batch; a cancelled waiter (e.g. a RoundAck that
    is no longer needed) must not cancel the batch others wait for."""
    await asyncio.shield(asyncio.wrap_future(fut))


def fold_digests(digests: bytes, group: int = DIGEST_GROUP) -> bytes:
    """One xxh3-128 per ``group`` consecutive chunk digests (the last group
    may be short): a Merkle level over them. Both sides fold the same way,
    so two folded lists are equal exactly when their groups are, with the
    same odds of a collision as the chunk digests themselves; the list that
    crosses the wire in the pause shrinks ``group``-fold (1 GiB: 1 MiB ->
    4 KiB, ~5 ms of a ~15 ms pause here with TLS), and a mismatch is still
    located, to ``group`` chunks."""
    step = group * DIGEST_BYTES
    if len(digests) <= step:
        return xxhash.xxh3_128_digest(digests) if digests else b""
    view = memoryview(digests)
    try:
        return b"".join(xxhash.xxh3_128_digest(view[o:o + step]) for o in range(0, len(digests), step))
    finally:
        view.release()


def first_difference(ours: bytes, theirs: bytes) -> int | None:
    """Index of the first chunk that differs, None when equal."""
    bad = diff_chunks(ours, theirs)
    return bad[0] if bad else None


class _DataExtents:
    """Page ranges known to hold data (SEEK_HOLE answers), kept for the
    life of a ChunkDigests: guest RAM is never punched, so data never turns
    back into a hole and a known extent stays true. Only a hole can go stale
    (the guest or a payload writes it): holes are always looked up afresh.
    tmpfs answers SEEK_HOLE by walking every data page up to the hole, so it
    is asked once per extent, not once per chunk or per batch."""

    def __init__(self, next_hole_page) -> None:
        self._hole = next_hole_page
        self._start = self._end = -1         # the last extent learnt: [start, end) holds data

    def holds(self, page: int) -> bool:
        return self._start <= page < self._end

    def learn(self, page: int) -> None:
        """``page`` holds data (SEEK_DATA said so): learn its extent."""
        if self._hole is not None:
            self._start, self._end = page, self._hole(page)


class ChunkDigests:
    """Incrementally maintained digests of one memory view (either side).

    ``next_data_page``/``next_hole_page`` (GuestRam's SEEK_DATA helpers) let
    chunks that are holes take the digest of zeros without being read.
    """

    def __init__(self, ram: memoryview, chunk_pages: int,
                 next_data_page: Callable[[int], int] | None = None,
                 next_hole_page: Callable[[int], int] | None = None, *, fresh_zero: bool = False) -> None:
        self.ram = ram
        self.chunk_pages = chunk_pages
        self.chunk_bytes = chunk_pages * PAGE_SIZE
        self.nchunks = (len(ram) + self.chunk_bytes - 1) // self.chunk_bytes
        self._data, self._hole = next_data_page, next_hole_page
        self._extents = _DataExtents(next_hole_page)
        n = self.nchunks
        self.gen = [1] * n
        self.hashed = [0] * n            # nothing hashed yet: every chunk is stale
        self.digests = bytearray(DIGEST_BYTES * n)
        if fresh_zero:                   # a fresh destination shell is zeros: start from their digests
            self._fill_zero()
        self._pending: set[int] = set()      # marked, not yet handed to the worker
        self._touched: set[int] = set(range(n)) if not fresh_zero else set()   # marked since the last drain()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="digest")
        self._inflight: concurrent.futures.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.chunks_hashed = 0

    def _fill_zero(self) -> None:
        n = self.nchunks
        self.digests[:] = xxhash.xxh3_128_digest(bytes(self.chunk_bytes)) * n
        last = len(self.ram) - (n - 1) * self.chunk_bytes
        if n and last != self.chunk_bytes:
            self.digests[-DIGEST_BYTES:] = xxhash.xxh3_128_digest(bytes(last))
        self.hashed = list(self.gen)

    def mark(self, runs) -> None:
        """Pages of these ``(first, count)`` runs changed (call after the bytes did)."""
        cp = self.chunk_pages
        gen, pending, touched = self.gen, self._pending, self._touched
        for first, count in runs:
            for c in range(first // cp, (first + count - 1) // cp + 1):
                gen[c] += 1
                pending.add(c)
                touched.add(c)
        if self._inflight is None or self._inflight.done():
            self._submit()

    def hash_now(self, runs) -> None:
        """Hash the chunks of ``runs`` right here, in the calling thread:
        the destination's receiving data stream, just after it wrote them
        (the bytes are still in cache, and no worker competes with it for
        the GIL). Only for chunks no one else writes or marks meanwhile: a
        chunk belongs to exactly one data stream (datastream.stream_of), and
        its marks come only from here. Nothing is left pending: a RoundAck
        needs no hashing backlog to catch up."""
        cp, step = self.chunk_pages, self.chunk_bytes
        ram, gen, hashed, digests = self.ram, self.gen, self.hashed, self.digests
        xxh = xxhash.xxh3_128_digest
        last = -1
        done = 0
        for first, count in runs:
            for c in range(first // cp, (first + count - 1) // cp + 1):
                if c == last:
                    continue
                last = c
                done += 1
                g = gen[c] + 1
                gen[c] = g
                off = c * step
                view = ram[off:off + step]
                digests[c * DIGEST_BYTES:(c + 1) * DIGEST_BYTES] = xxh(view)
                view.release()
                hashed[c] = g
        self.chunks_hashed += done

    def _submit(self) -> None:
        """Hand the pending chunks to the worker (loop thread only); when the
        worker is done it asks the loop for the next batch, so what the last
        round marked is hashed while the rest of the pause goes on."""
        if self._pending and (self._inflight is None or self._inflight.done()):
            chunks = sorted(self._pending)
            self._pending.clear()
            self._inflight = self._executor.submit(self._hash, chunks)
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                self._loop = None
            if self._loop is not None:
                loop = self._loop
                self._inflight.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._submit))

    def _hash(self, chunks: list[int]) -> None:
        """Hash ``chunks`` (sorted); a chunk that is a hole of the segment
        takes the digest of zeros without being read. A hole extent is looked
        up once, not once per chunk. The generations of a group are read
        before its lookups, so a write marked before a generation was read is
        always seen by the lookup that calls its page a hole (a hole is never
        claimed for memory a counted write filled)."""
        ram, step, gen, hashed, digests = self.ram, self.chunk_bytes, self.gen, self.hashed, self.digests
        n, cp = len(ram), self.chunk_pages
        npages = n // PAGE_SIZE
        data_fn = self._data
        zero: dict[int, bytes] = {}
        xxh = xxhash.xxh3_128_digest
        extents = self._extents
        for i in range(0, len(chunks), HASH_GROUP):
            group = chunks[i:i + HASH_GROUP]
            gens = [gen[c] for c in group]
            data_at = -1                 # as of after `gens`: pages before it (from the last lookup) are holes
            for k, c in enumerate(group):
                page = c * cp
                if data_fn is not None and not extents.holds(page):
                    chunk_end = min(page + cp, npages)
                    if data_at < page:
                        data_at = data_fn(page)       # SEEK_DATA: skips a hole extent at once
                    if data_at >= chunk_end:          # a hole: zeros, not read
                        size = (chunk_end - page) * PAGE_SIZE
                        d = zero.get(size)
                        if d is None:
                            d = zero[size] = xxh(bytes(size))
                        digests[c * DIGEST_BYTES:(c + 1) * DIGEST_BYTES] = d
                        hashed[c] = gens[k]
                        continue
                    if data_at <= page:
                        extents.learn(page)
                off = c * step
                view = ram[off:off + step]
                digests[c * DIGEST_BYTES:(c + 1) * DIGEST_BYTES] = xxh(view)
                view.release()
                hashed[c] = gens[k]
        self.chunks_hashed += len(chunks)

    async def drain(self) -> None:
        """Wait until every mark so far is hashed (the worker has caught up):
        called before the pause, so that the pause rehashes only what the last
        round changed (``_touched`` starts again from here)."""
        while True:
            if self._inflight is not None and not self._inflight.done():
                await _wait(self._inflight)
            elif self._pending:
                self._submit()
            else:
                # Marks happen only on the loop thread, so nothing was marked
                # since the worker went idle: every touched chunk is hashed.
                self._touched = {c for c in self._touched if self.hashed[c] != self.gen[c]}
                return

    async def finish(self, mode: str = "incremental") -> bytes | memoryview:
        """Digests of the memory as it is now (nothing may write it meanwhile):
        a read-only view of the digests kept here (incremental) or bytes (full)."""
        if self._inflight is not None:
            await _wait(self._inflight)
        self._pending.clear()
        loop = asyncio.get_running_loop()
        if mode == "full":
            return await loop.run_in_executor(
                self._executor, chunk_digests, self.ram, self.chunk_pages, self._data, self._hole)
        # Only chunks marked since the last drain can be stale (every other one
        # was hashed at its latest generation then): no scan of all chunks.
        stale = sorted(c for c in self._touched if self.hashed[c] != self.gen[c])
        if stale:
            await loop.run_in_executor(self._executor, self._hash, stale)
        # A view, not a copy: a fresh 1 MiB buffer costs ~4 ms of first-touch
        # page faults on this machine kind, inside the pause.
        return memoryview(self.digests).toreadonly()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.ram = memoryview(b"")        # drop the view of guest memory
