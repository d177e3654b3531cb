"""What one migration did, in numbers (cf. QEMU's MigrationStats)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass
class MigrationStats:
    ram_bytes: int = 0
    pages_total: int = 0
    pages_sent: int = 0            # pages whose bytes crossed the wire (all rounds)
    zero_pages: int = 0            # pages announced as zero, not sent
    bytes_sent: int = 0            # page payload bytes (headers excluded)
    wire_bytes: int = 0            # everything written to the socket
    rounds: int = 0                # pre-copy rounds completed (the full pass is round 1)
    dirty_syncs: int = 0
    remaining_bytes: int = 0
    dirty_rate_pps: float = 0.0
    bandwidth_bps: float = 0.0
    expected_downtime_ms: float = 0.0
    throttle_pct: int = 0
    downtime_ms: float = 0.0
    stop_copy_pages: int = 0
    prefault_ms: float = 0.0
    streams: int = 0                 # data streams the migration uses (negotiated)
    verify_ms: float = 0.0
    verify_mode: str = ""
    downtime_target_ms: int = 0    # the target in force (job set may change it)
    max_bandwidth_mibps: int = 0   # the cap in force, 0 = none
    guest_rate_before_pps: int = 0
    guest_rate_during_pps: int = 0
    writes_at_pause: int = 0
    writes_after_resume: int = 0
    convergence: str = ""
    round_log: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class BandwidthMeter:
    """Bytes per second over a sliding window of recent samples."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self._samples: list[tuple[float, int]] = []
        self.total = 0

    def add(self, nbytes: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.total += nbytes
        self._samples.append((now, self.total))
        cutoff = now - self.window_s
        while len(self._samples) > 2 and self._samples[1][0] < cutoff:
            self._samples.pop(0)

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
