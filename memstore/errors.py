"""Errors raised by memstore.

memstore never logs: it raises one of these (or ValueError for a plain
argument mistake such as an out-of-range page number) and the agent decides
what to report. Catch :class:`MemstoreError` to catch them all.
"""

from __future__ import annotations

__all__ = ["MemstoreError", "SegmentError", "WorkloadError", "GuestError"]


class MemstoreError(Exception):
    """Base class of every error memstore raises on purpose."""


class SegmentError(MemstoreError):
    """A shared-memory segment cannot be created, attached, validated or used
    (exists already, missing, wrong magic/version/size, bad vCPU state blob)."""


class WorkloadError(MemstoreError):
    """A workload spec is malformed or does not fit the VM."""


class GuestError(MemstoreError):
    """The guest process cannot be launched or is in the wrong state for the
    request (for example vCPU state asked for while the guest runs)."""
