"""Pre-copy convergence policy: pure functions, table-tested.

Compare QEMU ``migration_iteration_run`` / ``migration_should_complete``
(stop when what is left fits ``bandwidth x downtime limit``) and
``migration_trigger_throttle`` (auto-converge: throttle the guest when it
dirtied more than half of what was transferred, in two syncs in a row;
start at 20 %, add 10 % each time, cap at 99 %).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

THROTTLE_INITIAL_PCT = 20
THROTTLE_INCREMENT_PCT = 10
THROTTLE_MAX_PCT = 99
DIRTY_RATIO_TRIGGER = 0.5      # dirtied bytes / transferred bytes in a round
TRIGGER_ROUNDS = 2             # ... this many rounds in a row
STALL_ROUNDS = 3               # dirty set not shrinking for this many rounds


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
    remaining_history: tuple[int, ...] = ()   # remaining_bytes after each earlier round, oldest first


def threshold_bytes(bandwidth_bps: float, downtime_target_ms: int) -> int:
    """Bytes that can be sent within the downtime target at the measured bandwidth."""
    return int(max(bandwidth_bps, 0.0) * downtime_target_ms / 1000.0)


def expected_downtime_ms(remaining_bytes: int, bandwidth_bps: float) -> float:
    if bandwidth_bps <= 0:
        return float("inf") if remaining_bytes else 0.0
    return remaining_bytes / bandwidth_bps * 1000.0


def should_complete(f: RoundFacts) -> Decision:
    if f.remaining_bytes <= threshold_bytes(f.bandwidth_bps, f.downtime_target_ms):
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


def next_throttle(current_pct: int, dirtied_bytes: int, transferred_bytes: int, over_count: int) -> tuple[int, int]:
    """Auto-converge step. Returns (new throttle %, new over_count).

    ``over_count`` counts consecutive rounds in which the guest dirtied more
    than DIRTY_RATIO_TRIGGER of what the link moved; at TRIGGER_ROUNDS the
    throttle steps up and the count restarts.
    """
    if transferred_bytes <= 0 or dirtied_bytes <= DIRTY_RATIO_TRIGGER * transferred_bytes:
        return current_pct, 0
    over_count += 1
    if over_count < TRIGGER_ROUNDS:
        return current_pct, over_count
    if current_pct == 0:
        return THROTTLE_INITIAL_PCT, 0
    return min(THROTTLE_MAX_PCT, current_pct + THROTTLE_INCREMENT_PCT), 0
