"""Errors raised by memstore.

memstore never logs: it raises one of these (or ValueError for a plain
argument mistake such as an out-of-range page number) and the agent decides
what to report. Catch :class:`MemstoreError` to catch them all.
"""

from __future__ import annotations

__all__ = ["MemstoreError", "SegmentError", "WorkloadError", "GuestError", "DiskError"]


class MemstoreError(Exception):
    """Base class of every error memstore raises on purpose.

    ``errno`` is the OS error number behind it when there is one (e.g.
    ``errno.ENOSPC`` when /dev/shm or a disk's filesystem is full), else None.
    """

    def __init__(self, *args: object, errno: int | None = None) -> None:
        super().__init__(*args)
        self.errno = errno


class SegmentError(MemstoreError):
    """A shared-memory segment cannot be created, attached, validated or used
    (exists already, missing, wrong magic/version/size, bad vCPU state blob)."""


class WorkloadError(MemstoreError):
    """A workload spec is malformed or does not fit the VM."""


class GuestError(MemstoreError):
    """The guest process cannot be launched or is in the wrong state for the
    request (for example vCPU state asked for while the guest runs)."""


class DiskError(MemstoreError):
    """A disk image or its shared-memory dirty-block map cannot be created,
    opened, validated or used, or the guest refused a disk command."""
