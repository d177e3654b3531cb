"""Page geometry: page size, page runs, size parsing.

Everything in memstore counts in 4 KiB pages. A contiguous range of pages is
a :class:`PageRun` ``(first, count)``; ``end`` is one past the last page::

    PageRun(first=5, count=3)   covers pages 5, 6, 7   end == 8
    byte range in guest RAM     [5*4096, 8*4096) = [20480, 32768)

Sizes given by people (config, CLI, workload specs) go through
:func:`parse_size`, which takes binary units only: ``"64K"``, ``"256M"``,
``"1G"``, ``"256MiB"``, ``"1GiB"``, ``"4096"``, ``"4096B"``. Decimal
fractions (``"1.5G"``) and SI spellings (``"256MB"``, which some tools read as
10**6 and others as 2**20) are refused with a message saying what is accepted.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = [
    "PAGE_SIZE",
    "PAGE_SHIFT",
    "WORKLOAD_SPEC_MAX_BYTES",
    "DISK_BLOCK_SIZE",
    "PageRun",
    "pages_for",
    "round_up",
    "parse_size",
    "format_size",
]

PAGE_SIZE = 4096
PAGE_SHIFT = 12

# The control page stores the workload spec in a fixed region of this size
# (UTF-8). It lives here so that control.py and workload.py agree on it
# without importing each other.
WORKLOAD_SPEC_MAX_BYTES = 512

# Disks are tracked, copied and written in blocks of this size (see
# memstore/disk.py for why 64 KiB). Here so that workload.py can check
# ``iows`` without importing disk.py.
DISK_BLOCK_SIZE = 64 * 1024


class PageRun(NamedTuple):
    """``count`` contiguous pages starting at page ``first``."""

    first: int
    count: int

    @property
    def end(self) -> int:
        """One past the last page of the run."""
        return self.first + self.count


def round_up(n: int, m: int) -> int:
    """Smallest multiple of ``m`` that is >= ``n`` (``m`` > 0, ``n`` >= 0)."""
    if m <= 0:
        raise ValueError(f"round_up: multiple must be positive, got {m}")
    if n < 0:
        raise ValueError(f"round_up: value must be non-negative, got {n}")
    return -(-n // m) * m


def pages_for(size_bytes: int) -> int:
    """Number of pages in ``size_bytes``; a positive multiple of PAGE_SIZE."""
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int):
        raise ValueError(f"size must be an int number of bytes, got {size_bytes!r}")
    if size_bytes <= 0 or size_bytes % PAGE_SIZE:
        raise ValueError(
            f"size must be a positive multiple of {PAGE_SIZE} bytes, got {size_bytes}"
        )
    return size_bytes // PAGE_SIZE


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"([0-9]+)\s*([A-Za-z]*)")
_SUFFIXES = {"": "", "B": ""}
for _u in "KMGT":
    _SUFFIXES[_u] = _u
    _SUFFIXES[_u + "IB"] = _u


def parse_size(text: str) -> int:
    """Parse a byte size with an optional binary unit.

    >>> parse_size("256M"), parse_size("1GiB"), parse_size("64k"), parse_size("512")
    (268435456, 1073741824, 65536, 512)
    """
    if not isinstance(text, str):
        raise ValueError(f"size must be a string such as '256M', got {text!r}")
    m = _SIZE_RE.fullmatch(text.strip())
    suffix = m.group(2).upper() if m else None
    if suffix in {"KB", "MB", "GB", "TB"}:
        raise ValueError(
            f"invalid size {text!r}: {m.group(2)!r} is ambiguous (10**n or 2**n bytes); "
            f"write {suffix[0]!r} or {suffix[0] + 'iB'!r} (binary units)"
        )
    if m is None or suffix not in _SUFFIXES:
        raise ValueError(
            f"invalid size {text!r}: expected a whole number of bytes with an optional "
            "binary unit K, M, G or T (or KiB, MiB, GiB, TiB), e.g. '256M', '1GiB', '4096'"
        )
    return int(m.group(1)) * _UNITS[_SUFFIXES[suffix]]


def format_size(size_bytes: int) -> str:
    """Shortest exact spelling of a size that parse_size() reads back."""
    for unit in ("T", "G", "M", "K"):
        mult = _UNITS[unit]
        if size_bytes and size_bytes % mult == 0:
            return f"{size_bytes // mult}{unit}"
    return str(size_bytes)
