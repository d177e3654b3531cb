"""The section interface: what every migratable part of a VM implements.

Compare QEMU's ``SaveVMHandlers`` (migration/register.h): a migration is a
list of sections (RAM, each disk, device state...) and a driver that walks
the phases over all of them without knowing what a page or a block is.

Outgoing half (source), in call order::

    setup_info()            -> dict       goes into Prepare.setup (msgpack)
    begin_round(n)                        start round n (1 = the full pass)
    iterate(budget_bytes)   -> bool       send up to ~budget; True = this round is done
    pending_estimate()      -> int        bytes still to send, cheap (no dirty sync)
    pending_exact()         -> int        bytes still to send, exact
    complete()                            at the pause: send everything left
    digests(mode)           -> (chunk_pages, bytes)   of the frozen source
    cleanup(committed)                    always, once

Incoming half (destination)::

    setup(info)                           build what receives (admission already passed)
    payload_sink(batch)     -> views      where a PageBatch's payload lands (zero copy);
                                          called by a data stream's thread
    apply_in_stream(batch)                in that thread and in stream order, after a
                                          batch's payload landed or for a zero batch (a
                                          newer copy of a page is always behind it)
    on_batch(batch) / on_state(data)      loop thread: after a batch's bytes / a SectionState arrived
    digests(mode)           -> (chunk_pages, bytes)   of what it holds, guest still paused
    activate()                            just before the guest resumes (e.g. open files)
    cleanup(committed)                    always, once: a failed migration undoes setup

``JOINS`` says when a section takes part: ``"stream"`` sections are sent in
the pre-copy rounds (RAM); ``"switchover"`` sections run on their own (a
mirror that keeps itself converged, like QEMU's block mirror jobs that
replaced block migration in the stream) and join only at the pause with
``complete()`` and ``digests()``. Post-copy (userfaultfd) fits as another
outgoing mode of the RAM section: ``complete()`` sends only what the
destination needs to resume, and the incoming half serves faults after
``activate()``; nothing in the driver changes but the order of verify and
resume, which post-copy has to relax per page.

To add a section: subclass both halves, give it a unique ``NAME``, and add
a factory to ``SectionRegistry`` (see ``agent/migration/ram.py`` for the
reference implementation and ``tests/integration/test_sections.py`` for a
tiny device-state section that goes through the same driver).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

from protocol import PageBatch


class OutgoingSection(abc.ABC):
    NAME: ClassVar[str]
    JOINS: ClassVar[str] = "stream"
    section_id: int = 0
    bytes_sent: int = 0

    def setup_info(self) -> dict:
        return {}

    def release_info(self) -> dict:
        """What the source must do once the destination runs the VM, kept in
        the durable outbound record so a restarted agent does it too:
        ``{"delete_files": [paths]}`` (e.g. disk images copied to the
        destination; shared files are never listed)."""
        return {}

    def begin_round(self, round_no: int) -> None:
        """Start a pre-copy round (stream sections only)."""

    async def iterate(self, budget_bytes: int) -> bool:
        return True

    def pending_estimate(self) -> int:
        return 0

    def pending_exact(self) -> int:
        return self.pending_estimate()

    async def settle(self) -> None:
        """Before the pause: catch up background work (e.g. hashing) so that
        it is not downtime."""

    @abc.abstractmethod
    async def complete(self) -> None:
        """At the pause (guest frozen): send everything still missing."""

    @abc.abstractmethod
    async def digests(self, mode: str) -> tuple[int, bytes]:
        """(chunk_pages, digests) of the frozen source."""

    async def cleanup(self, committed: bool) -> None:
        """Release what setup took; ``committed`` = the destination owns the VM."""


class IncomingSection(abc.ABC):
    NAME: ClassVar[str]
    section_id: int = 0

    @abc.abstractmethod
    async def setup(self, info: dict) -> None:
        """Build what receives; raise AdmissionRefused for a bad or impossible setup."""

    def payload_sink(self, batch: PageBatch) -> Sequence[memoryview]:
        from protocol import ErrorCode, RemoteProtocolError
        raise RemoteProtocolError(f"section {self.NAME!r} takes no page batches", ErrorCode.UNEXPECTED)

    def apply_in_stream(self, batch: PageBatch) -> None:
        """In the receiving stream's thread and order: after a batch's
        payload landed, or a zero batch's (no payload) effect. A section that
        keeps all effects in ``on_batch`` (which runs on the loop in each
        stream's order too) leaves this empty."""

    def on_batch(self, batch: PageBatch) -> None:
        """A batch's bytes (or its zero runs) are in place (loop thread)."""

    async def settle(self) -> None:
        """Before acknowledging a round: catch up background work (hashing of
        what arrived), so the source pauses only once this side is idle."""

    def on_state(self, data: bytes) -> None:
        from protocol import ErrorCode, RemoteProtocolError
        raise RemoteProtocolError(f"section {self.NAME!r} takes no state", ErrorCode.UNEXPECTED)

    @abc.abstractmethod
    async def digests(self, mode: str) -> tuple[int, bytes]:
        """(chunk_pages, digests) of what this host holds (guest still paused)."""

    async def activate(self) -> None:
        """The VM is about to run here."""

    async def cleanup(self, committed: bool) -> None:
        """Undo setup unless ``committed``."""


OutFactory = Callable[..., "OutgoingSection | None"]
InFactory = Callable[..., "IncomingSection"]


@dataclass
class SectionRegistry:
    """Which sections a VM migrates with, by name. A factory for the outgoing
    half returns None when the VM has nothing for that section (e.g. no
    disks); the destination builds exactly the sections Prepare names."""

    outgoing: dict[str, OutFactory] = field(default_factory=dict)
    incoming: dict[str, InFactory] = field(default_factory=dict)
    #: name -> ``probe(info, host)``: the destination's admission check of one
    #: section's setup in a dry run (raise AdmissionRefused); optional.
    probes: dict[str, Callable] = field(default_factory=dict)
    #: name -> ``async plan(host, vm, target, options) -> options``: run by the
    #: source before each attempt (e.g. choose shared or copied storage by a
    #: dry-run probe of the destination); optional.
    planners: dict[str, Callable] = field(default_factory=dict)

    def register(self, name: str, out: OutFactory, inc: InFactory, *, probe: Callable | None = None,
                 plan: Callable | None = None) -> None:
        if name in self.outgoing:
            raise ValueError(f"section {name!r} is registered twice")
        self.outgoing[name] = out
        self.incoming[name] = inc
        if probe is not None:
            self.probes[name] = probe
        if plan is not None:
            self.planners[name] = plan

    async def plan(self, host, vm, target: str, options: dict) -> dict:
        for planner in self.planners.values():
            options = await planner(host, vm, target, options)
        return options

    def probe(self, names: Sequence[str], infos: Sequence[dict], host) -> None:
        for name, info in zip(names, infos):
            probe = self.probes.get(name)
            if probe is not None:
                probe(info, host)

    def build_outgoing(self, **ctx) -> list[OutgoingSection]:
        sections = [s for s in (f(**ctx) for f in self.outgoing.values()) if s is not None]
        for i, s in enumerate(sections):
            s.section_id = i
        return sections

    def check_incoming(self, names: Sequence[str]) -> None:
        from agent.errors import AdmissionRefused
        from protocol import ErrorCode

        for name in names:
            if name not in self.incoming:
                raise AdmissionRefused(f"this agent cannot receive section {name!r}", ErrorCode.INCOMPATIBLE)

    def build_incoming(self, names: Sequence[str], **ctx) -> list[IncomingSection]:
        self.check_incoming(names)
        out = []
        for i, name in enumerate(names):
            s = self.incoming[name](**ctx)
            s.section_id = i
            out.append(s)
        return out
