"""Zero-page detection for the first pass ("zero pages are announced, not sent").

:func:`split_zero` cuts a run into granules of ``granule_pages`` pages,
counted from ``run.first`` (the last granule may be short), classifies each
as zero or data, and merges neighbours of the same kind::

    run = PageRun(100, 40), granule_pages = 16
    granules:  [100,116) zero   [116,132) data   [132,140) zero (short)
    result:    data_runs = [PageRun(116, 16)]
               zero_runs = [PageRun(100, 16), PageRun(132, 8)]

A granule is zero iff all its bytes are zero; one non-zero byte makes the
whole granule data (granule-level detection, so a mostly-zero granule is
sent whole). The test is a C-speed xxh3_128 of the granule compared with the
precomputed digest of an all-zero granule of the same length: a non-zero
granule is misread as zero only on a 128-bit hash collision (and the
verify phase would still catch it). ``memoryview == bytes`` is not used: it
compares element by element (~7 us per zero page).

Measured on the reference machine (2-vCPU EPYC, Python 3.11, xxhash 4.1):
~0.04 s per GiB for incompressible data and about the same for zero memory
with the default 16-page granules.
"""

from __future__ import annotations

import functools

import xxhash

from .layout import PAGE_SIZE, PageRun

__all__ = ["GRANULE_PAGES", "split_zero", "is_zero"]

GRANULE_PAGES = 16

_digest = xxhash.xxh3_128_intdigest


@functools.lru_cache(maxsize=16)
def _zero_digest(nbytes: int) -> int:
    return _digest(bytes(nbytes))


def is_zero(view) -> bool:
    """True if every byte of ``view`` is zero (hash test, see module doc)."""
    return _digest(view) == _zero_digest(len(view))


def split_zero(
    ram: memoryview, run: PageRun, granule_pages: int = GRANULE_PAGES
) -> tuple[list[PageRun], list[PageRun]]:
    """(data_runs, zero_runs) covering ``run`` exactly, each list in page
    order, neighbours of the same kind merged."""
    first, count = run
    if granule_pages <= 0:
        raise ValueError(f"granule_pages must be positive, got {granule_pages}")
    if first < 0 or count < 0 or (first + count) * PAGE_SIZE > len(ram):
        raise ValueError(f"run {run} outside guest RAM of {len(ram) // PAGE_SIZE} pages")
    data: list[PageRun] = []
    zero: list[PageRun] = []
    if count == 0:
        return data, zero
    gbytes = granule_pages * PAGE_SIZE
    zfull = _zero_digest(gbytes)
    start = first * PAGE_SIZE
    stop = (first + count) * PAGE_SIZE
    digest = _digest
    cur_zero = None  # kind of the open run
    cur_first = first
    page = first
    for off in range(start, stop, gbytes):
        end = off + gbytes
        if end > stop:
            end = stop
            zd = _zero_digest(end - off)
        else:
            zd = zfull
        g = ram[off:end]
        z = digest(g) == zd
        g.release()
        if z is not cur_zero:
            if cur_zero is not None:
                (zero if cur_zero else data).append(PageRun(cur_first, page - cur_first))
            cur_zero = z
            cur_first = page
        page += granule_pages
    page = first + count
    (zero if cur_zero else data).append(PageRun(cur_first, page - cur_first))
    return data, zero
