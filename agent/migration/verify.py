"""Verification without hashing all guest memory inside the pause.

The destination keeps xxh3-128 digests of its memory in chunks of
``digest_chunk_pages(npages)`` pages, computed *while pages arrive*: every batch
that lands (or zero run that is cleared) bumps the generation of the chunks
it touched, and a single worker thread hashes touched chunks in the
background (xxhash releases the GIL). A chunk hashed at generation g is
stale once a later batch bumps it past g, so ``finish()`` rehashes only the
chunks touched since their last hash: after the last round that is a few
chunks, not the whole memory.

    loop thread:  batch lands -> gen[c] += 1, pending.add(c) -> submit(pending)
    worker:       g = gen[c]; d = xxh3_128(chunk c); digest[c] = d; hashed[c] = g
    finish():     wait for the worker; rehash every c with hashed[c] != gen[c]

The marks happen only after a batch's bytes are all in memory, so a hash
that started before them is always seen as stale. The source hashes its
frozen copy after it sent Resume and compares; it commits only on a match.
"""
from __future__ import annotations

import asyncio
import concurrent.futures

import xxhash

from memstore import PAGE_SIZE

DIGEST_CHUNK_PAGES = 256      # default for callers that do not size it
MIN_CHUNK_PAGES = 16
MAX_DIGEST_LIST_BYTES = 2 * 2**20
_DIGEST = 16


def digest_chunk_pages(npages: int) -> int:
    """Chunk size for a VM: as small as possible (less to rehash at the pause:
    the last round's scattered pages each dirty one chunk) while the digest
    list stays within MAX_DIGEST_LIST_BYTES (one Digests frame). 1 GiB -> 4
    pages... see MIN_CHUNK_PAGES."""
    cp = MIN_CHUNK_PAGES
    while (npages + cp - 1) // cp * _DIGEST > MAX_DIGEST_LIST_BYTES:
        cp *= 2
    return cp


class ReceiveDigests:
    def __init__(self, ram: memoryview, chunk_pages: int = DIGEST_CHUNK_PAGES) -> None:
        self.ram = ram
        self.chunk_pages = chunk_pages
        self.chunk_bytes = chunk_pages * PAGE_SIZE
        n = (len(ram) + self.chunk_bytes - 1) // self.chunk_bytes
        self.nchunks = n
        self.gen = [0] * n
        self.hashed = [0] * n
        # A fresh shell is all zeros: start from the digests of zero chunks.
        full = xxhash.xxh3_128_digest(bytes(self.chunk_bytes))
        self.digests = bytearray(full * n)
        last = len(ram) - (n - 1) * self.chunk_bytes
        if n and last != self.chunk_bytes:
            self.digests[-_DIGEST:] = xxhash.xxh3_128_digest(bytes(last))
        self._pending: set[int] = set()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="digest")
        self._inflight: concurrent.futures.Future | None = None
        self.chunks_hashed = 0

    def mark(self, runs) -> None:
        """Pages of these runs changed (call after their bytes are in memory)."""
        cp = self.chunk_pages
        gen, pending = self.gen, self._pending
        for first, count in runs:
            for c in range(first // cp, (first + count - 1) // cp + 1):
                gen[c] += 1
                pending.add(c)
        if self._inflight is None or self._inflight.done():
            self._submit()

    def _submit(self) -> None:
        if self._pending:
            chunks = sorted(self._pending)
            self._pending.clear()
            self._inflight = self._executor.submit(self._hash, chunks)

    def _hash(self, chunks: list[int]) -> None:
        ram, step, gen, hashed, digests = self.ram, self.chunk_bytes, self.gen, self.hashed, self.digests
        for c in chunks:
            g = gen[c]
            off = c * step
            view = ram[off:off + step]
            try:
                d = xxhash.xxh3_128_digest(view)
            finally:
                view.release()
            digests[c * _DIGEST:(c + 1) * _DIGEST] = d
            hashed[c] = g
        self.chunks_hashed += len(chunks)

    async def finish(self) -> bytes:
        """Digests of the memory as it is now (nothing may write it meanwhile)."""
        if self._inflight is not None:
            await asyncio.wrap_future(self._inflight)
        self._pending.clear()
        stale = [c for c in range(self.nchunks) if self.hashed[c] != self.gen[c]]
        if stale:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._hash, stale)
        return bytes(self.digests)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
