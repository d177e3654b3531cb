"""Guest workload specs and the pure page-choice function.

Spec grammar (whitespace around the whole spec is ignored, nothing else)::

    idle
    uniform:rate=N              N pages/s, each page drawn uniformly from all pages
    hotset:ws=SIZE,rate=N       N pages/s, uniformly over the hot set = pages [0, ws/4096)
    sequential:rate=N           N pages/s, pages cursor, cursor+1, ... wrapping at npages

``N`` is a non-negative decimal integer (at most MAX_RATE_PPS); ``SIZE`` goes
through :func:`memstore.layout.parse_size` and must be a positive multiple of
PAGE_SIZE. Keys may come in any order, each exactly once.

The guest's write stream is a pure function of (workload, npages, seed,
counter, cursor) -- :func:`page_for_write` -- so its whole vCPU state is
``(seed, writes, cursor)`` plus the spec, and a guest resumed elsewhere from
that state writes exactly the pages the original would have written next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import WorkloadError
from .layout import PAGE_SIZE, WORKLOAD_SPEC_MAX_BYTES, parse_size

__all__ = [
    "KINDS",
    "MAX_RATE_PPS",
    "Workload",
    "parse_workload",
    "validate_for",
    "page_for_write",
    "splitmix64",
]

MAX_RATE_PPS = 10_000_000
KINDS = ("idle", "uniform", "hotset", "sequential")
_KEYS = {"idle": frozenset(), "uniform": frozenset({"rate"}), "hotset": frozenset({"ws", "rate"}),
         "sequential": frozenset({"rate"})}

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
    if not wanted:
        if sep:
            raise WorkloadError(f"workload {kind!r} takes no parameters, got {spec!r}")
        return Workload(kind=kind, rate_pps=0, ws_bytes=None, spec=text)
    params: dict[str, str] = {}
    if sep and rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key or not value:
                raise WorkloadError(f"bad parameter {item!r} in {spec!r}; expected key=value")
            if key not in wanted:
                raise WorkloadError(
                    f"unknown parameter {key!r} for workload {kind!r} in {spec!r}; "
                    f"expected {', '.join(sorted(wanted))}"
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
    rate_text = params["rate"]
    if not _INT_RE.fullmatch(rate_text):
        raise WorkloadError(f"rate must be a non-negative integer (pages/s), got {rate_text!r}")
    rate = int(rate_text)
    if rate > MAX_RATE_PPS:
        raise WorkloadError(f"rate {rate} exceeds the limit of {MAX_RATE_PPS} pages/s")
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
    return Workload(kind=kind, rate_pps=rate, ws_bytes=ws_bytes, spec=text)


def validate_for(workload: Workload, memory_bytes: int) -> None:
    """WorkloadError unless ``workload`` can run in a VM of ``memory_bytes``."""
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
