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

Fast path: one byte of every page is gathered first (a strided slice, C
speed); a granule with any non-zero sample is data without further reads,
so only granules whose samples are all zero are hashed. Incompressible
memory then costs one cache line per page instead of a full read.
Measured on the reference machine (2-vCPU EPYC, Python 3.11, xxhash 4.1),
before the fast path: ~0.04 s per GiB for incompressible data and about the
same for zero memory with the default 16-page granules.
"""

from __future__ import annotations

import functools
import re

import xxhash

from .layout import PAGE_SIZE, PageRun

__all__ = ["GRANULE_PAGES", "split_zero", "is_zero"]

GRANULE_PAGES = 16

_digest = xxhash.xxh3_128_intdigest
_ZERO_STRETCH = re.compile(rb"\x00+")


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
    gp = granule_pages
    ngranules = -(-count // gp)
    # Fast path: one byte per page, gathered at C speed. A granule with any
    # non-zero sample is data without being read further; only granules whose
    # samples are all zero (every granule of zero memory, about none of
    # incompressible memory) are hashed to decide.
    samples = bytes(ram[first * PAGE_SIZE:(first + count) * PAGE_SIZE:PAGE_SIZE])
    candidates: list[int] = []
    for m in _ZERO_STRETCH.finditer(samples):
        a, b = m.span()
        g = -(-a // gp)                                 # first granule starting inside the stretch
        while g < ngranules and g * gp < b and min((g + 1) * gp, count) <= b:
            candidates.append(g)
            g += 1
    gbytes = gp * PAGE_SIZE
    zfull = _zero_digest(gbytes)
    is_zero_granule = {}
    for g in candidates:
        off = (first + g * gp) * PAGE_SIZE
        end = min(off + gbytes, (first + count) * PAGE_SIZE)
        view = ram[off:end]
        try:
            is_zero_granule[g] = _digest(view) == (zfull if end - off == gbytes else _zero_digest(end - off))
        finally:
            view.release()
    # Runs: granules not in is_zero_granule (or False there) are data.
    zero_gs = [g for g in candidates if is_zero_granule[g]]
    pos = 0                                             # granule index
    for g in zero_gs + [ngranules]:
        if g > pos:
            _append(data, first + pos * gp, first + min(g * gp, count))
        if g < ngranules:
            _append(zero, first + g * gp, first + min((g + 1) * gp, count))
        pos = g + 1
    return data, zero


def _append(runs: list[PageRun], start: int, end: int) -> None:
    if runs and runs[-1].first + runs[-1].count == start:
        runs[-1] = PageRun(runs[-1].first, end - runs[-1].first)
    else:
        runs.append(PageRun(start, end - start))
