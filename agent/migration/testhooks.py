"""Hold points for tests only: stop a migration at the entry of a phase.

TEST-ONLY. Nothing in production sets ``LIVEMIG_TEST_HOLD``; when it is
unset (or does not name the role and phase) ``hold`` returns at once and
costs one frozenset lookup. The variable is read once, at import.

Contract (the drivers call this at the *entry* of each phase, on both
sides, right after the phase transition)::

    await hold(data_dir, role, phase, job_id)

- ``role`` is ``"source"`` or ``"destination"``; ``phase`` is a
  ``MigrationPhase`` value (``negotiate``, ``setup``, ``precopy``,
  ``stop-and-copy``, ``verify``, ``resume``, ``commit``) or the
  ``MigrationPhase`` itself.
- ``LIVEMIG_TEST_HOLD`` is a comma-separated list of ``ROLE:PHASE``
  (e.g. ``source:precopy,destination:commit``). When ``ROLE:PHASE`` is in
  it, ``hold`` creates ``<data_dir>/held.<role>.<phase>`` holding the job id
  (written to a temporary name first, then renamed: a test that sees the
  file can read the id at once), then polls every ~5 ms until the test
  deletes that file, then returns.
- It holds every migration that reaches that role and phase (one file per
  role and phase: a second job would wait for the same file).
- Cancelled while waiting (agent shutdown), it removes its file and
  re-raises ``CancelledError``. A SIGKILLed agent leaves the file behind;
  the test removes it.

The event loop keeps running while a migration is held (control requests
are served, timers of other tasks fire), so what the peer does meanwhile is
part of what a test observes.
"""
from __future__ import annotations

import asyncio
import os

ENV = "LIVEMIG_TEST_HOLD"
POLL_S = 0.005
ROLES = ("source", "destination")


def parse_holds(spec: str) -> frozenset[str]:
    """``"source:precopy, destination:commit"`` -> {"source:precopy", "destination:commit"}."""
    return frozenset(p.strip() for p in spec.split(",") if p.strip())


HOLDS: frozenset[str] = parse_holds(os.environ.get(ENV, ""))


def hold_path(data_dir: str, role: str, phase: str) -> str:
    return os.path.join(data_dir, f"held.{role}.{phase}")


def _phase_value(phase) -> str:
    return getattr(phase, "value", phase)


async def hold(data_dir: str, role: str, phase, job_id: str) -> None:
    """Wait at this phase while the test holds it (see the module docstring); else a no-op."""
    if not HOLDS:
        return
    phase = _phase_value(phase)
    if f"{role}:{phase}" not in HOLDS:
        return
    path = hold_path(data_dir, role, phase)
    tmp = os.path.join(data_dir, f".held.{role}.{phase}.{os.getpid()}.tmp")   # not matched by held.*
    with open(tmp, "w") as f:
        f.write(job_id)
    os.replace(tmp, path)
    try:
        while os.path.exists(path):
            await asyncio.sleep(POLL_S)
    except asyncio.CancelledError:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        raise


def stream_hold() -> tuple[int, int] | None:
    """``LIVEMIG_TEST_STREAM_HOLD=stream:round``: the destination's data
    stream ``stream`` reads nothing until another stream received a page of
    round ``round``, so that stream's older copies are still in flight while
    newer rounds land on the others (the ordering test). None: no hold."""
    spec = os.environ.get("LIVEMIG_TEST_STREAM_HOLD", "")
    if not spec:
        return None
    stream, _, rnd = spec.partition(":")
    return int(stream), int(rnd or 2)
