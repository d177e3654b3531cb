"""memstore: guest state held in memory -- shared-memory guest RAM, dirty
maps, page digests, zero-page scans, workloads, VM disks (sparse images with
shared-memory dirty-block maps) and the guest process.

Plain synchronous code over os.open + mmap, files and psutil: no
networking, no event loop, no logging (errors are raised, results returned).
The agent imports from here; memstore never imports agent or protocol.

The guest-process helpers (``launch_guest``, ``is_guest_process``,
``find_guests``) are loaded lazily so that ``python -m memstore.guest`` does
not import its own module twice.
"""

from __future__ import annotations

from .control import Cmd, ControlBlock, DiskCmd, DiskIoState, GuestState
from .digest import DIGEST_SIZE, chunk_digests, diff_chunks, page_digest
from .dirtymap import DirtyMap, runs_from_snapshot
from .disk import (
    BLOCK_SIZE,
    DiskImage,
    DiskInfo,
    DiskMap,
    add_disk,
    disk_map_name,
    disk_sizes,
    list_disk_maps,
    list_disks,
    parse_disk_map_name,
    pause_disk_io,
    remove_disks,
    reopen_disk,
    resume_disk_io,
    unlink_disk_maps,
)
from .errors import DiskError, GuestError, MemstoreError, SegmentError, WorkloadError
from .layout import PAGE_SIZE, PageRun, pages_for, parse_size, round_up
from .scan import split_zero
from .segment import (
    GuestRam,
    list_segments,
    segment_exists,
    segment_path,
    shm_dir,
    unlink_segment,
)
from .workload import Workload, disk_write_for, page_for_write, parse_workload, validate_for

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
    "DiskError",
    "GuestRam",
    "shm_dir",
    "segment_path",
    "segment_exists",
    "list_segments",
    "unlink_segment",
    "Cmd",
    "GuestState",
    "ControlBlock",
    "DiskCmd",
    "DiskIoState",
    "BLOCK_SIZE",
    "DiskImage",
    "DiskInfo",
    "DiskMap",
    "add_disk",
    "disk_map_name",
    "disk_sizes",
    "list_disk_maps",
    "list_disks",
    "parse_disk_map_name",
    "pause_disk_io",
    "remove_disks",
    "reopen_disk",
    "resume_disk_io",
    "unlink_disk_maps",
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
    "disk_write_for",
    *sorted(_LAZY),
]


def __getattr__(name: str):
    if name in _LAZY:
        from . import guest

        return getattr(guest, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
