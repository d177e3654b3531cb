"""Migration phases: one enum, one transition table, one compare-and-swap setter.

Compare QEMU's ``MigrationStatus`` and ``migrate_set_state``: a phase moves
only from the phase the caller expects, and only along ``TRANSITIONS``.
Both drivers (source and destination) use the same vocabulary; the values
are what logs, ``jobs --json`` and reports show.

    queued -> negotiate -> setup -> precopy -> stop-and-copy -> verify
           -> resume -> commit -> completed
    negotiate/setup -> queued   (destination busy: wait and retry)
    any non-final phase -> cancelling -> cancelled
    any non-final phase -> rolling-back -> failed
"""
from __future__ import annotations

import contextlib
import enum
import gc
import time
from typing import Final, Iterator, Mapping

from agent.errors import InvalidTransition


class MigrationPhase(enum.Enum):
    QUEUED = "queued"
    NEGOTIATE = "negotiate"
    SETUP = "setup"
    PRECOPY = "precopy"
    STOP_AND_COPY = "stop-and-copy"
    VERIFY = "verify"
    RESUME = "resume"
    COMMIT = "commit"
    COMPLETED = "completed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ROLLING_BACK = "rolling-back"
    FAILED = "failed"


P = MigrationPhase
_ACTIVE = (P.QUEUED, P.NEGOTIATE, P.SETUP, P.PRECOPY, P.STOP_AND_COPY, P.VERIFY, P.RESUME)
_ABORT = frozenset({P.CANCELLING, P.ROLLING_BACK})

TRANSITIONS: Final[Mapping[MigrationPhase, frozenset[MigrationPhase]]] = {
    P.QUEUED: frozenset({P.NEGOTIATE}) | _ABORT,
    # Back to the queue when the destination is busy (or, in a drain, full)
    # before anything was transferred.
    P.NEGOTIATE: frozenset({P.SETUP, P.QUEUED}) | _ABORT,
    P.SETUP: frozenset({P.PRECOPY, P.QUEUED}) | _ABORT,
    P.PRECOPY: frozenset({P.STOP_AND_COPY}) | _ABORT,
    P.STOP_AND_COPY: frozenset({P.VERIFY}) | _ABORT,
    # Verification comes before resume: until Resume is sent the source owns
    # the VM, so a mismatch, a deadline or a cancel simply resumes it there.
    P.VERIFY: frozenset({P.RESUME}) | _ABORT,
    # Once Resume is sent, cancel is no longer possible: the destination may
    # run the guest. A lost answer is resolved by asking (-> commit, or roll
    # back when the destination says it discarded its copy).
    P.RESUME: frozenset({P.COMMIT, P.ROLLING_BACK}),
    # Commit is the point of no return: the destination owns the VM.
    P.COMMIT: frozenset({P.COMPLETED}),
    P.CANCELLING: frozenset({P.CANCELLED}),
    P.ROLLING_BACK: frozenset({P.FAILED}),
    P.COMPLETED: frozenset(),
    P.CANCELLED: frozenset(),
    P.FAILED: frozenset(),
}

FINAL: Final = frozenset({P.COMPLETED, P.CANCELLED, P.FAILED})


def is_terminal(phase: MigrationPhase) -> bool:
    return phase in FINAL


def is_active(phase: MigrationPhase) -> bool:
    return phase in _ACTIVE or phase is P.COMMIT


def is_cancellable(phase: MigrationPhase) -> bool:
    return P.CANCELLING in TRANSITIONS[phase]


class PhaseTracker:
    """Holds one migration's phase and the time spent in each.

    ``set_phase(expected=..., new=...)`` is the only way to move; it raises
    ``InvalidTransition`` when the current phase is not ``expected`` or the
    move is not in the table. ``on_change(old, new, elapsed_ms)`` is called
    after every move (the driver logs it).
    """

    def __init__(self, initial: enum.Enum = P.QUEUED, on_change=None, *,
                 transitions: Mapping = TRANSITIONS, what: str = "phase") -> None:
        self._phase = initial
        self._since = time.monotonic()
        self.durations_ms: dict[str, float] = {}
        self._on_change = on_change
        self._transitions = transitions      # one tracker for every kind of job (migrations, storage moves)
        self._what = what

    @property
    def phase(self) -> MigrationPhase:
        return self._phase

    def on_change(self, callback) -> None:
        """``callback(old, new, elapsed_ms)`` after every move (one at a time)."""
        self._on_change = callback

    def set_phase(self, *, expected, new) -> None:
        allowed = expected if isinstance(expected, tuple) else (expected,)
        old = self._phase
        if old not in allowed:
            raise InvalidTransition(f"{self._what} is {old.value}, expected {'|'.join(p.value for p in allowed)}")
        if new not in self._transitions[old]:
            prefix = "" if self._what == "phase" else self._what.split()[0] + " "
            raise InvalidTransition(f"{prefix}{old.value} -> {new.value} is not a legal transition")
        now = time.monotonic()
        elapsed_ms = (now - self._since) * 1000.0
        self.durations_ms[old.value] = self.durations_ms.get(old.value, 0.0) + elapsed_ms
        self._phase, self._since = new, now
        if self._on_change is not None:
            self._on_change(old, new, elapsed_ms)


def log_phase_change(old: MigrationPhase, new: MigrationPhase, elapsed_ms: float) -> None:
    """The drivers' phase-change callback: one structured log line."""
    from agent.observe.logs import get_logger

    get_logger("livemig.migration").info("phase_changed", old=old.value, new=new.value,
                                         elapsed_ms=round(elapsed_ms, 1))


_gc_holds = 0


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a guest is paused for a
    switchover: a full collection of the agent's heap took 15 ms here, as
    long as the whole pause it would land in. Nested and concurrent
    switchovers share one hold; collection resumes when the last one ends."""
    global _gc_holds
    _gc_holds += 1
    if _gc_holds == 1:
        gc.disable()
    try:
        yield
    finally:
        _gc_holds -= 1
        if _gc_holds == 0:
            gc.enable()
