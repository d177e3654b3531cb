"""Guest workload specs and the pure page-choice function.

Spec grammar (whitespace around the whole spec is ignored, nothing else)::

    idle
    uniform:rate=N              N pages/s, each page drawn uniformly from all pages
    hotset:ws=SIZE,rate=N       N pages/s, uniformly over the hot set = pages [0, ws/4096)
    sequential:rate=N           N pages/s, pages cursor, cursor+1, ... wrapping at npages

Every kind also takes the optional disk IO keys (``idle:io=N`` is a VM that
only writes its disks)::

    io=N                        N disk block writes/s over all the VM's disks (default 0)
    iows=SIZE                   writes land in the first SIZE bytes of each disk
                                (default: the whole disk)

e.g. ``hotset:ws=64M,rate=20000,io=2000,iows=256M``.

``N`` is a non-negative decimal integer (at most MAX_RATE_PPS pages/s, at
most MAX_IO_WPS disk writes/s); ``SIZE`` goes through
:func:`memstore.layout.parse_size` and must be a positive multiple of
PAGE_SIZE (``ws``) or of DISK_BLOCK_SIZE, 64 KiB (``iows``). Keys may come in
any order, each exactly once.

The guest's write stream is a pure function of (workload, npages, seed,
counter, cursor) -- :func:`page_for_write` -- so its whole vCPU state is
``(seed, writes, cursor)`` plus the spec, and a guest resumed elsewhere from
that state writes exactly the pages the original would have written next.
Disk writes likewise: :func:`disk_write_for` picks (disk, block) from
(workload, the disks' working sets, seed, io_writes, io_cursor).

Disk write pattern: the disks' working sets (each disk's first
``min(iows, size)`` bytes, in blocks) are laid end to end, W blocks in all,
so writes spread over the disks in proportion to their working sets.
``sequential`` writes block ``io_cursor`` and advances it (wrapping at W);
the other kinds draw ``splitmix64(seed ^ IO_SALT ^ io_counter) % W`` and
leave the cursor alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import WorkloadError
from collections.abc import Sequence

from .layout import DISK_BLOCK_SIZE, PAGE_SIZE, WORKLOAD_SPEC_MAX_BYTES, parse_size

__all__ = [
    "KINDS",
    "MAX_RATE_PPS",
    "MAX_IO_WPS",
    "IO_SALT",
    "io_ws_blocks",
    "disk_write_for",
    "Workload",
    "parse_workload",
    "validate_for",
    "page_for_write",
    "splitmix64",
]

MAX_RATE_PPS = 10_000_000
MAX_IO_WPS = 100_000        # a 64 KiB pwrite costs ~10-20 us in the guest
IO_SALT = 0xD15CD15CD15CD15C  # disk picks are not correlated with page picks
KINDS = ("idle", "uniform", "hotset", "sequential")
_KEYS = {"idle": frozenset(), "uniform": frozenset({"rate"}), "hotset": frozenset({"ws", "rate"}),
         "sequential": frozenset({"rate"})}
_IO_KEYS = frozenset({"io", "iows"})

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_INT_RE = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class Workload:
    """A parsed workload spec. ``spec`` is the (stripped) text it came from,
    which is what the control page and the vCPU state carry."""

    kind: str
    rate_pps: int
    ws_bytes: int | None
    spec: str
    io_wps: int = 0                 # disk block writes/s over all disks
    io_ws_bytes: int | None = None  # None: the whole of each disk

    @property
    def ws_pages(self) -> int | None:
        return None if self.ws_bytes is None else self.ws_bytes // PAGE_SIZE


def parse_workload(spec: str) -> Workload:
    """Parse a workload spec (see the module docstring); WorkloadError on
    anything else, with a message naming the problem."""
    if not isinstance(spec, str):
        raise WorkloadError(f"workload spec must be a string, got {spec!r}")
    text = spec.strip()
    if len(text.encode("utf-8")) > WORKLOAD_SPEC_MAX_BYTES:
        raise WorkloadError(f"workload spec longer than {WORKLOAD_SPEC_MAX_BYTES} bytes")
    kind, sep, rest = text.partition(":")
    if kind not in _KEYS:
        raise WorkloadError(
            f"unknown workload kind {kind!r} in {spec!r}; expected one of {', '.join(KINDS)}"
        )
    wanted = _KEYS[kind]
    allowed = wanted | _IO_KEYS
    params: dict[str, str] = {}
    if sep and rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key or not value:
                raise WorkloadError(f"bad parameter {item!r} in {spec!r}; expected key=value")
            if key not in allowed:
                raise WorkloadError(
                    f"unknown parameter {key!r} for workload {kind!r} in {spec!r}; "
                    f"expected {', '.join(sorted(allowed))}"
                )
            if key in params:
                raise WorkloadError(f"parameter {key!r} given twice in {spec!r}")
            params[key] = value
    missing = wanted - params.keys()
    if missing:
        raise WorkloadError(
            f"workload {kind!r} needs {', '.join(sorted(missing))} (e.g. "
            f"{'hotset:ws=64M,rate=20000' if kind == 'hotset' else kind + ':rate=20000'}), got {spec!r}"
        )
    if sep and not rest and not wanted:
        raise WorkloadError(f"bad workload {spec!r}: write {kind!r} or {kind + ':io=N'!r}")
    rate = 0
    if "rate" in wanted:
        rate_text = params["rate"]
        if not _INT_RE.fullmatch(rate_text):
            raise WorkloadError(f"rate must be a non-negative integer (pages/s), got {rate_text!r}")
        rate = int(rate_text)
        if rate > MAX_RATE_PPS:
            raise WorkloadError(f"rate {rate} exceeds the limit of {MAX_RATE_PPS} pages/s")
    io = 0
    if "io" in params:
        if not _INT_RE.fullmatch(params["io"]):
            raise WorkloadError(f"io must be a non-negative integer (disk writes/s), got {params['io']!r}")
        io = int(params["io"])
        if io > MAX_IO_WPS:
            raise WorkloadError(f"io {io} exceeds the limit of {MAX_IO_WPS} disk writes/s")
    io_ws = None
    if "iows" in params:
        try:
            io_ws = parse_size(params["iows"])
        except ValueError as exc:
            raise WorkloadError(f"bad disk working-set size: {exc}") from None
        if io_ws <= 0 or io_ws % DISK_BLOCK_SIZE:
            raise WorkloadError(
                f"iows must be a positive multiple of {DISK_BLOCK_SIZE} bytes (the disk block), "
                f"got {params['iows']!r}"
            )
    ws_bytes = None
    if kind == "hotset":
        try:
            ws_bytes = parse_size(params["ws"])
        except ValueError as exc:
            raise WorkloadError(f"bad hot-set size: {exc}") from None
        if ws_bytes <= 0 or ws_bytes % PAGE_SIZE:
            raise WorkloadError(
                f"hot-set size must be a positive multiple of {PAGE_SIZE} bytes, got {params['ws']!r}"
            )
    return Workload(kind=kind, rate_pps=rate, ws_bytes=ws_bytes, spec=text,
                    io_wps=io, io_ws_bytes=io_ws)


def validate_for(workload: Workload, memory_bytes: int,
                 disk_sizes: Sequence[int] | None = None) -> None:
    """WorkloadError unless ``workload`` can run in a VM of ``memory_bytes``
    and, when ``disk_sizes`` (bytes per disk) is given, with those disks:
    ``io`` > 0 needs at least one disk and ``iows`` must fit every disk.
    (None: the disks are not known here, only the RAM part is checked.)"""
    if disk_sizes is not None:
        if workload.io_wps and not disk_sizes:
            raise WorkloadError(f"io={workload.io_wps} needs a disk; the VM has none ({workload.spec!r})")
        if workload.io_ws_bytes is not None:
            for i, size in enumerate(disk_sizes):
                if workload.io_ws_bytes > size:
                    raise WorkloadError(
                        f"disk working set of {workload.io_ws_bytes} bytes does not fit disk {i} "
                        f"of {size} bytes ({workload.spec!r})"
                    )
    if memory_bytes <= 0 or memory_bytes % PAGE_SIZE:
        raise WorkloadError(f"VM memory must be a positive multiple of {PAGE_SIZE}, got {memory_bytes}")
    if workload.ws_bytes is not None and workload.ws_bytes > memory_bytes:
        raise WorkloadError(
            f"hot set of {workload.ws_bytes} bytes does not fit a VM of {memory_bytes} bytes "
            f"({workload.spec!r})"
        )


def splitmix64(x: int) -> int:
    """SplitMix64 finaliser of ``x`` (mod 2**64): a cheap, well-mixed hash."""
    z = (x + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return z ^ (z >> 31)


def io_ws_blocks(workload: Workload, disks: Sequence[tuple[int, int]]) -> list[int]:
    """Blocks of each disk's working set, from (size_bytes, block_size) per
    disk: ``min(iows, size) // block_size``, at least 1 (iows larger than a
    disk -- refused by validate_for -- means the whole disk)."""
    out = []
    for size, block_size in disks:
        ws = size if workload.io_ws_bytes is None else min(workload.io_ws_bytes, size)
        out.append(max(1, ws // block_size))
    return out


def disk_write_for(
    workload: Workload, ws_blocks: Sequence[int], seed: int, io_counter: int, io_cursor: int
) -> tuple[int, int, int]:
    """(disk index, block, cursor after) of disk write number ``io_counter``
    (1-based); see the module docstring. WorkloadError without disks."""
    total = sum(ws_blocks)
    if not total:
        raise WorkloadError("no disk to write")
    if workload.kind == "sequential":
        pos = io_cursor % total
        cursor = (pos + 1) % total
    else:
        pos = splitmix64(seed ^ IO_SALT ^ io_counter) % total
        cursor = io_cursor
    for disk, n in enumerate(ws_blocks):
        if pos < n:
            return disk, pos, cursor
        pos -= n
    raise AssertionError("unreachable")


def page_for_write(
    workload: Workload, npages: int, seed: int, counter: int, cursor: int
) -> tuple[int, int]:
    """Page written by write number ``counter`` (1-based) and the cursor after it.

    uniform:    splitmix64(seed ^ counter) % npages, cursor unchanged
    hotset:     splitmix64(seed ^ counter) % ws_pages, cursor unchanged
    sequential: page = cursor, new cursor = (cursor + 1) % npages
    idle never writes (WorkloadError).
    """
    kind = workload.kind
    if kind == "uniform":
        return splitmix64(seed ^ counter) % npages, cursor
    if kind == "hotset":
        return splitmix64(seed ^ counter) % min(workload.ws_bytes // PAGE_SIZE, npages), cursor
    if kind == "sequential":
        page = cursor % npages
        return page, (page + 1) % npages
    raise WorkloadError(f"workload {workload.kind!r} does not write pages")
