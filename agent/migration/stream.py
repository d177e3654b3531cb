"""The source's migration stream: what sections send through.

One place for what every section's data shares: the wire (PageBatch frames
with the section id, on the migration's data streams: agent/net/datastream.py),
the statistics, the bandwidth pacers (the migration's own cap and the
host's), and auto-converge, reconsidered once a period even inside a long
round (convergence.py).
"""
from __future__ import annotations

import asyncio
import time

import msgpack

from memstore import BLOCK_SIZE, PAGE_SIZE
from protocol import Prepare

from agent.migration import convergence
from agent.migration.stats import BandwidthMeter
from agent.observe.logs import get_logger

log = get_logger("livemig.source")

HEADER_BYTES = 32          # prefix + a small body, for the wire-bytes estimate
DISK_BLOCK_PAGES = BLOCK_SIZE // PAGE_SIZE   # a guest disk write dirties one 64 KiB block


def prepare_message(job, vm, host, sections, verify_mode: str, streams: int) -> Prepare:
    return Prepare(
        migration_id=job.id, vm=vm.name, memory_bytes=vm.record.memory_bytes, workload=vm.record.workload,
        features=(), source=host.name, sections=tuple(s.NAME for s in sections),
        setup=msgpack.packb([s.setup_info() for s in sections]), verify_mode=verify_mode,
        streams=streams,
    )


class SourceStream:
    def __init__(self, conn, job, host, max_bandwidth_bps: int, vm) -> None:
        self.conn, self.job, self.host, self.vm = conn, job, host, vm
        self.stats = job.stats
        self.max_bandwidth_bps = max_bandwidth_bps
        self.data = None                  # OutboundStreams, once Ready granted them
        self.io_timeout_s = host.cfg.migration.io_timeout_s
        self.meter = BandwidthMeter()
        self.pages_sent = 0
        self._bw_t0 = time.monotonic()
        self._bw_bytes = 0
        self._thr_t, self._thr_writes, self._thr_bytes, self._thr_over = time.monotonic(), 0, 0, 0

    def set_max_bandwidth(self, bps: int) -> None:
        """A new cap (0 = none) counts from now, not from the start."""
        self.max_bandwidth_bps = bps
        self._bw_t0, self._bw_bytes = time.monotonic(), 0

    def start_clock(self) -> None:
        now = time.monotonic()
        self._bw_t0 = now
        self._thr_t, self._thr_bytes = now, self.meter.total
        self._thr_writes = int(self.vm.ctl.writes) + int(self.vm.ctl.io_writes) * DISK_BLOCK_PAGES

    def device_state(self, paused_ms: float) -> bytes:
        r = self.vm.record
        return msgpack.packb({"vm": r.name, "memory_bytes": r.memory_bytes, "workload": r.workload,
                              "paused_ms": round(paused_ms, 3)})

    # ---- sending -----------------------------------------------------------
    async def pages(self, section, round_no: int, runs: list[tuple[int, int]], mem: memoryview) -> int:
        """Send the pages of ``runs`` from ``mem`` (4 KiB units); returns bytes sent."""
        pages = sum(c for _, c in runs)
        nbytes = pages * PAGE_SIZE
        self.conn.check()                  # an Abort or a lost control connection stops the pages too
        await self.data.send(section.section_id, round_no, runs, mem)
        st = self.stats
        st.pages_sent += pages
        st.bytes_sent += nbytes
        st.wire_bytes += nbytes + HEADER_BYTES + 8 * len(runs)
        section.bytes_sent += nbytes
        self.pages_sent += pages
        self.meter.add(nbytes)
        await self._pace(nbytes)
        self.throttle_check()
        return nbytes

    async def zero(self, section, round_no: int, runs: list[tuple[int, int]]) -> None:
        self.conn.check()
        await self.data.send(section.section_id, round_no, runs, None, zero=True)
        self.stats.zero_pages += sum(c for _, c in runs)
        self.stats.wire_bytes += HEADER_BYTES + 8 * len(runs)

    async def _pace(self, nbytes: int) -> None:
        if self.max_bandwidth_bps:
            self._bw_bytes += nbytes
            delay = self._bw_t0 + self._bw_bytes / self.max_bandwidth_bps - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        if self.host.bandwidth is not None:
            await self.host.bandwidth.consume(nbytes)

    # ---- auto-converge -------------------------------------------------------
    def throttle_check(self, force: bool = False) -> None:
        """Auto-converge, once per period (also inside a long round)."""
        now = time.monotonic()
        period = now - self._thr_t
        if (period < convergence.THROTTLE_PERIOD_S and not force) or period <= 0.05:
            return
        ctl = self.vm.ctl
        # What the guest dirties: RAM pages and disk blocks (64 KiB), both slowed by the throttle.
        writes = int(ctl.writes) + int(ctl.io_writes) * DISK_BLOCK_PAGES
        dirty_bps = (writes - self._thr_writes) * PAGE_SIZE / period
        bw = (self.meter.total - self._thr_bytes) / period
        self._thr_t, self._thr_writes, self._thr_bytes = now, writes, self.meter.total
        st = self.stats
        st.dirty_rate_pps = dirty_bps / PAGE_SIZE
        if bw > 0:
            st.bandwidth_bps = bw            # live figure; a finished round sets its own
        new_pct, self._thr_over = convergence.next_throttle(st.throttle_pct, dirty_bps, bw, self._thr_over)
        if new_pct != st.throttle_pct:
            st.throttle_pct = new_pct
            ctl.throttle_pct = new_pct
            log.info("auto_converge_throttle", throttle_pct=new_pct, dirty_mbps=round(dirty_bps * 8 / 1e6, 1),
                     link_mbps=round(bw * 8 / 1e6, 1))
