"""memstore: guest state held in memory -- shared-memory guest RAM, dirty
maps, page digests, zero-page scans, workloads and the guest process.

Plain synchronous code over os.open + mmap, files and psutil: no
networking, no event loop, no logging (errors are raised, results returned).
The agent imports from here; memstore never imports agent or protocol.

The guest-process helpers (``launch_guest``, ``is_guest_process``,
``find_guests``) are loaded lazily so that ``python -m memstore.guest`` does
not import its own module twice.
"""

from __future__ import annotations

from .control import Cmd, ControlBlock, GuestState
from .digest import DIGEST_SIZE, chunk_digests, diff_chunks, page_digest
from .dirtymap import DirtyMap, runs_from_snapshot
from .errors import GuestError, MemstoreError, SegmentError, WorkloadError
from .layout import PAGE_SIZE, PageRun, pages_for, parse_size, round_up
from .scan import split_zero
from .segment import (
    GuestRam,
    list_segments,
    segment_exists,
    segment_path,
    unlink_segment,
)
from .workload import Workload, page_for_write, parse_workload, validate_for

_LAZY = {"launch_guest", "is_guest_process", "find_guests"}

__all__ = [
    "PAGE_SIZE",
    "PageRun",
    "pages_for",
    "round_up",
    "parse_size",
    "MemstoreError",
    "SegmentError",
    "WorkloadError",
    "GuestError",
    "GuestRam",
    "segment_path",
    "segment_exists",
    "list_segments",
    "unlink_segment",
    "Cmd",
    "GuestState",
    "ControlBlock",
    "DirtyMap",
    "runs_from_snapshot",
    "DIGEST_SIZE",
    "chunk_digests",
    "diff_chunks",
    "page_digest",
    "split_zero",
    "Workload",
    "parse_workload",
    "validate_for",
    "page_for_write",
    *sorted(_LAZY),
]


def __getattr__(name: str):
    if name in _LAZY:
        from . import guest

        return getattr(guest, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
