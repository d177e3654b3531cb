import pytest

from agent.migration.convergence import (
    THROTTLE_INITIAL_PCT,
    THROTTLE_MAX_PCT,
    TRIGGER_PERIODS,
    Decision,
    RoundFacts,
    expected_downtime_ms,
    next_throttle,
    should_complete,
    threshold_bytes,
)

GiB = 2**30
MiB = 2**20


@pytest.mark.parametrize(
    "remaining, bw, target, rnd, max_rounds, throttle, hist, expected",
    [
        (0, 1 * GiB, 300, 1, 10, 0, (), Decision.COMPLETE),
        (100 * MiB, 1 * GiB, 300, 1, 10, 0, (), Decision.COMPLETE),          # 100 MiB < 307 MiB
        # fits, but one more round is cheap and pays: the set halved and is above 1 MiB
        (24 * MiB, 3 * GiB, 300, 1, 10, 0, (1 * GiB,), Decision.ITERATE),
        (int(0.8 * MiB), 3 * GiB, 300, 2, 10, 0, (1 * GiB, 24 * MiB), Decision.COMPLETE),   # small: go
        (20 * MiB, 3 * GiB, 300, 3, 10, 0, (1 * GiB, 24 * MiB), Decision.COMPLETE),   # not halving: go
        (24 * MiB, 3 * GiB, 300, 10, 10, 0, (1 * GiB, 100 * MiB), Decision.COMPLETE),  # no rounds left
        (400 * MiB, 1 * GiB, 300, 1, 10, 0, (), Decision.ITERATE),
        (400 * MiB, 1 * GiB, 300, 10, 10, 0, (), Decision.COMPLETE_MAX_ROUNDS),
        (400 * MiB, 1 * GiB, 300, 11, 10, 0, (), Decision.COMPLETE_MAX_ROUNDS),
        (1 * MiB, 0.0, 300, 2, 10, 0, (), Decision.ITERATE),                    # no bandwidth measured yet
        (400 * MiB, 1 * GiB, 300, 5, 10, 99, (300 * MiB, 350 * MiB, 380 * MiB), Decision.COMPLETE_STALLED),
        (400 * MiB, 1 * GiB, 300, 5, 10, 50, (300 * MiB, 350 * MiB, 380 * MiB), Decision.ITERATE),  # can still throttle
        (400 * MiB, 1 * GiB, 300, 5, 10, 99, (900 * MiB, 800 * MiB, 500 * MiB), Decision.ITERATE),  # still shrinking
    ],
)
def test_should_complete_table(remaining, bw, target, rnd, max_rounds, throttle, hist, expected):
    f = RoundFacts(round=rnd, remaining_bytes=remaining, bandwidth_bps=bw, downtime_target_ms=target,
                   max_rounds=max_rounds, throttle_pct=throttle, remaining_history=hist)
    assert should_complete(f) is expected


def test_threshold_and_expected_downtime():
    assert threshold_bytes(1e9, 300) == 300_000_000
    assert threshold_bytes(-5, 300) == 0
    assert expected_downtime_ms(300_000_000, 1e9) == pytest.approx(300.0)
    assert expected_downtime_ms(0, 0) == 0.0
    assert expected_downtime_ms(1, 0) == float("inf")


@pytest.mark.parametrize(
    "pct, dirty_bps, bw_bps, over, expected",
    [
        (0, 10, 100, 0, (0, 0)),                    # guest dirties little: no throttle, counter resets
        (0, 60, 100, 0, (THROTTLE_INITIAL_PCT, 0)),  # over the ratio: start at 20 %
        (20, 60, 100, 0, (30, 0)),                  # then +10 %
        (95, 60, 100, 0, (THROTTLE_MAX_PCT, 0)),    # capped
        (99, 400, 100, 0, (99, 0)),
        (30, 60, 0, 0, (30, 0)),                    # nothing measured: no information
        (30, 50, 100, 0, (30, 0)),                  # exactly half is not over
    ],
)
def test_next_throttle_table(pct, dirty_bps, bw_bps, over, expected):
    assert TRIGGER_PERIODS == 1
    assert next_throttle(pct, dirty_bps, bw_bps, over) == expected
