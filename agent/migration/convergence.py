"""Pre-copy convergence policy: pure functions, table-tested.

Compare QEMU ``migration_iteration_run`` / ``migration_should_complete``
(stop when what is left fits ``bandwidth x downtime limit``) and
``migration_trigger_throttle`` (auto-converge: throttle the guest when it
dirties more than half of what the link carries; start at 20 %, add 10 %
each time, cap at 99 %). Difference from QEMU, on purpose: QEMU looks at
two bitmap syncs in a row, and its syncs come once per round; a round here
over a 1 Gbit/s link lasts seconds (8.6 s for 1 GiB), so the throttle is
reconsidered every THROTTLE_PERIOD_S, inside rounds too, and one period
over the ratio is enough to step.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

THROTTLE_INITIAL_PCT = 20
THROTTLE_INCREMENT_PCT = 10
THROTTLE_MAX_PCT = 99
DIRTY_RATIO_TRIGGER = 0.5      # dirty rate / link rate over a period
THROTTLE_PERIOD_S = 1.0        # how often the throttle is reconsidered (also inside a long round)
TRIGGER_PERIODS = 1            # ... periods over the ratio in a row before a step
STALL_ROUNDS = 3               # dirty set not shrinking for this many rounds
SMALL_REMAINDER_BYTES = 1 << 20   # below this the pause is ~1 ms: switch over
MAX_EXTRA_ROUNDS = 2             # rounds after the last round's ack, when waiting for it let the rest grow
SHRINK_FACTOR = 2              # "pays": the last round at least halved the dirty set


class Decision(enum.Enum):
    ITERATE = "iterate"
    COMPLETE = "complete"                  # remaining fits the downtime target
    COMPLETE_MAX_ROUNDS = "max-rounds"     # forced switchover after max rounds
    COMPLETE_STALLED = "stalled"           # not converging and cannot throttle further


@dataclass(frozen=True, slots=True)
class RoundFacts:
    round: int                  # rounds completed so far (the first full pass is round 1)
    remaining_bytes: int        # dirty bytes still to send
    bandwidth_bps: float        # measured bytes per second
    downtime_target_ms: int
    max_rounds: int
    throttle_pct: int = 0
    remaining_history: tuple[int, ...] = ()   # remaining_bytes before this round's, oldest first
                                              # (round 1's "before" is all of RAM)


def threshold_bytes(bandwidth_bps: float, downtime_target_ms: int) -> int:
    """Bytes that can be sent within the downtime target at the measured bandwidth."""
    return int(max(bandwidth_bps, 0.0) * downtime_target_ms / 1000.0)


def expected_downtime_ms(remaining_bytes: int, bandwidth_bps: float) -> float:
    if bandwidth_bps <= 0:
        return float("inf") if remaining_bytes else 0.0
    return remaining_bytes / bandwidth_bps * 1000.0


def should_complete(f: RoundFacts) -> Decision:
    """Switch over now, or run another round?

    Fits the downtime target: switch over, unless one more round is cheap
    and pays: the rest is above SMALL_REMAINDER_BYTES and the last round at
    least halved the dirty set (a hot set at 20,000 pages/s leaves ~6,000
    pages after a 1 GiB first pass; one more round of ~10 ms leaves ~200, and
    the pause shrinks from ~16 ms of sending to ~1 ms). A set that stopped
    shrinking switches over at once, so this never adds more than a few
    short rounds (and never past max_rounds).
    """
    if f.remaining_bytes <= threshold_bytes(f.bandwidth_bps, f.downtime_target_ms):
        previous = f.remaining_history[-1] if f.remaining_history else None
        shrinking = previous is not None and f.remaining_bytes * SHRINK_FACTOR <= previous
        if f.remaining_bytes > SMALL_REMAINDER_BYTES and shrinking and f.round < f.max_rounds:
            return Decision.ITERATE
        return Decision.COMPLETE
    if f.round >= f.max_rounds:
        return Decision.COMPLETE_MAX_ROUNDS
    hist = f.remaining_history
    if (
        f.throttle_pct >= THROTTLE_MAX_PCT
        and len(hist) >= STALL_ROUNDS
        and min(hist[-STALL_ROUNDS:]) <= f.remaining_bytes
    ):
        return Decision.COMPLETE_STALLED
    return Decision.ITERATE


def next_throttle(current_pct: int, dirty_bps: float, bandwidth_bps: float, over_count: int) -> tuple[int, int]:
    """Auto-converge step, evaluated once per THROTTLE_PERIOD_S. Returns (new %, new over_count).

    ``dirty_bps`` is the rate at which the guest dirties memory (its write
    events x page size over the period: what KVM's dirty ring or PML would
    count), ``bandwidth_bps`` what the link moved. A period in which the
    guest dirtied more than DIRTY_RATIO_TRIGGER of the bandwidth counts as
    over; TRIGGER_PERIODS of them in a row step the throttle up (20 %, then
    +10 %, at most 99 %) and restart the count.
    """
    if bandwidth_bps <= 0 or dirty_bps <= DIRTY_RATIO_TRIGGER * bandwidth_bps:
        return current_pct, 0
    over_count += 1
    if over_count < TRIGGER_PERIODS:
        return current_pct, over_count
    if current_pct == 0:
        return THROTTLE_INITIAL_PCT, 0
    return min(THROTTLE_MAX_PCT, current_pct + THROTTLE_INCREMENT_PCT), 0
