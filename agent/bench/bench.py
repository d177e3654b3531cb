"""``livemig bench``: real agents, real migrations, figures against the raw-TCP baseline.

    livemig bench [--quick] [--json] [--out DIR] [--only SCEN,...] [--runs N] [--security tls|insecure]
                  [--verify incremental|full] [--streams N|auto]

Every run of every scenario starts two fresh agents (``AgentProcess``) on
127.0.0.1 with a shm prefix of its own, migrates A -> B, and cleans up in
``finally`` (cancel, delete VMs, stop agents, reap leftovers by PID, remove
the work dir) even when something fails. The raw-TCP baseline
(``agent.bench.rawtcp``) is measured in the same run, first; ``idle-1g`` and
``hotset-1g`` also pair every migration with raw runs taken right before it
(pre-faulted 1 connection, fresh "end-to-end" 1 connection, fresh 2
connections), ``scale`` with a fresh raw run of each size and ``drain`` with
fresh raw runs of its bytes. What each scenario measures and why:
``docs/BENCHMARK.md``.

Output: a table on stdout (or one JSON document with ``--json``), and
``bench-<timestamp>.json``/``.md`` plus ``latest.json``/``latest.md`` in
``--out`` (default ``bench-results/``). Progress goes to stderr.

Exit status: 0 when every run of every selected scenario completed its
migration(s) and nothing leaked (a target MISS is a figure, not a failure),
1 otherwise, 2 on a usage error.

The agents speak mutual TLS (the default, as in production): each cluster
gets a throwaway CA in its work dir (``AgentProcess``'s ``ThrowawayCA``,
made with openssl). ``--security insecure`` runs them without TLS, for the
TLS-vs-plain comparison in docs/SECURITY.md (run both in the same sitting).

Adding a scenario = one entry in ``SCENARIOS`` (a function ``run(ctx) ->
RunRecord``), plus optional targets in ``TARGETS``.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil

from agent.bench import rawtcp
from agent.errors import AgentError
from agent.control.proc import AgentProcess, wait_for

GiB = 1 << 30
MiB = 1 << 20
SHM_DIR = "/dev/shm"
POLL_S = 0.05
WARMUP_TIMEOUT_S = 20.0            # a non-idle guest must report a 1 s write rate within this
DEST_CHECK_TIMEOUT_S = 10.0
LINK_MIBPS = 119                   # hotset-1g-hot: the agent's own cap, ~1 Gbit/s (119 MiB/s = 0.998 Gbit/s)
DEFAULT_DOWNTIME_TARGET_MS = 300   # agent default (config.MigrationSection.downtime_target_ms)
TINY_DIVISOR = 16                  # --tiny: every size / 16 (1 GiB -> 64 MiB)


class BenchError(Exception):
    """A scenario run could not be carried out (harness or agent failure)."""


# ============================================================================ statistics
def summarize(values) -> dict | None:
    """``{median, min, max, n}`` of the numbers in ``values`` (None ignored); None if there are none."""
    xs = [float(v) for v in values if v is not None and not isinstance(v, bool)]
    if not xs:
        return None
    return {"median": _r(statistics.median(xs)), "min": _r(min(xs)), "max": _r(max(xs)), "n": len(xs)}


def linear_fit(xs, ys) -> tuple[float, float, float]:
    """Least squares ``y = slope * x + intercept``; returns (slope, intercept, R²)."""
    n = len(xs)
    if n != len(ys) or n < 2:
        raise ValueError("linear_fit needs two or more (x, y) pairs")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("linear_fit: all x are equal")
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    return slope, intercept, r2


def _r(x: float, nd: int = 4) -> float | int:
    if isinstance(x, int):
        return x
    if math.isfinite(x) and x == int(x) and abs(x) < 2**53:
        return int(x)
    return round(x, nd)


def size_label(n: int) -> str:
    if n % GiB == 0:
        return f"{n // GiB}G"
    return f"{n // MiB}M"


# ============================================================================ configuration
@dataclass
class BenchConfig:
    runs: int = 3
    quick: bool = False
    divisor: int = 1                   # every VM size / divisor (--tiny: 16)
    only: tuple[str, ...] = ()
    out_dir: str = "bench-results"
    as_json: bool = False
    shm_base: str = ""
    tcp_runs: int = 5
    tcp_bytes: int = GiB
    write_files: bool = True
    security: str = "tls"              # tls | insecure: the agents' security.mode
    verify: str = "incremental"        # incremental | full: the agents' migration.verify
    streams: int | None = None         # the agents' migration.streams (0 = auto); None: the agents' default

    def size(self, nbytes: int) -> int:
        return max(16 * MiB, nbytes // self.divisor)


@dataclass
class RunRecord:
    """One run of one scenario: flat numeric metrics + the raw agent reports."""
    ok: bool = False                    # every migration of the run completed
    error: str | None = None
    metrics: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)   # non-numeric facts (convergence, per-size table, ...)
    reports: list = field(default_factory=list)
    leaks: list = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"ok": self.ok, "error": self.error, "seconds": round(self.seconds, 2), "metrics": self.metrics,
                "info": self.info, "leaks": self.leaks, "reports": self.reports}


@dataclass
class Ctx:
    cfg: BenchConfig
    baseline: dict | None
    prefix: str
    log: Callable[[str], None]


# ============================================================================ agents
def _proc_mem(pid: int) -> dict:
    """VmRSS split from /proc/<pid>/status: guest memory is shared (RssShmem), the agent's own is anon+file."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


class Cluster:
    """Two fresh agents, A (source) and B (destination), with one shm prefix; leaves nothing behind."""

    def __init__(self, prefix: str, log: Callable[[str], None], security: str = "tls",
                 verify: str = "incremental", streams: int | None = None) -> None:
        self.prefix = prefix
        self.log = log
        self.workdir = tempfile.mkdtemp(prefix="livemig-bench-")
        # TLS: both get certificates from one throwaway CA made in the work dir (removed with it)
        insecure = security == "insecure"
        extra: tuple[str, ...] = ("--set", f"migration.verify={verify}")
        if streams is not None:           # [migration] streams = N (0 = auto) on both agents
            extra += ("--set", f"migration.streams={streams}")
        self.a = AgentProcess("A", self.workdir, shm_prefix=prefix, insecure=insecure, extra_args=extra)
        self.b = AgentProcess("B", self.workdir, shm_prefix=prefix, insecure=insecure, extra_args=extra)
        self.leaks: list[str] = []

    def __enter__(self) -> "Cluster":
        try:
            self.a.start()
            self.b.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tails(self, lines: int = 12) -> str:
        return "\n".join(f"--- {ag.name} log tail:\n{ag.log_tail(lines)}" for ag in (self.a, self.b))

    def close(self) -> None:
        for ag in (self.a, self.b):
            try:
                self._empty(ag)
            except Exception as exc:  # noqa: BLE001 - cleanup goes on
                self.log(f"cleanup of agent {ag.name}: {exc!r}")
            try:
                ag.stop(timeout_s=20.0)
            except Exception as exc:  # noqa: BLE001
                self.log(f"stopping agent {ag.name}: {exc!r}")
                ag.kill()
        self.leaks = reap_leftovers(self.prefix)
        if self.leaks:
            self.log(f"LEAK after cleanup (removed): {self.leaks}")
        shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _empty(ag: AgentProcess) -> None:
        """Cancel outbound jobs, then delete every VM (waiting out migrations that end by themselves)."""
        if not ag.alive():
            return
        for j in ag.call("jobs", timeout_s=10.0):
            if j.get("direction") == "outbound" and j.get("state") not in ("completed", "failed", "cancelled"):
                try:
                    ag.call("cancel", timeout_s=60.0, id=j["id"])
                except AgentError:
                    pass
        deadline = time.monotonic() + 60.0
        while True:
            left = ag.call("vm.list", timeout_s=10.0)
            if not left:
                return
            for v in left:
                try:
                    ag.call("vm.delete", timeout_s=30.0, name=v["name"])
                except AgentError:
                    pass
            if time.monotonic() > deadline:
                return
            time.sleep(POLL_S)


def _cluster(ctx: "Ctx") -> Cluster:
    return Cluster(ctx.prefix, ctx.log, ctx.cfg.security, ctx.cfg.verify, ctx.cfg.streams)


def reap_leftovers(prefix: str) -> list[str]:
    """Segments ``<prefix>.*`` and processes carrying that prefix, found by name, killed by PID, reported."""
    found: list[str] = []
    procs = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if p.pid != me and any(part == prefix or part.startswith(prefix + ".") for part in cmd):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs:
        found.append(f"process {p.pid}")
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(prefix + ".")]
    except OSError:
        names = []
    for n in names:
        found.append(f"segment {n}")
        try:
            os.unlink(os.path.join(SHM_DIR, n))
        except FileNotFoundError:
            pass
    return found


# ============================================================================ one migration
def _wait(cond: Callable[[], Any], timeout_s: float, what: str):
    return wait_for(cond, timeout_s, POLL_S, what, error=BenchError)


def _nominal_rate(workload: str) -> int:
    for part in workload.partition(":")[2].split(","):
        k, _, v = part.partition("=")
        if k == "rate":
            return int(v)
    return 0


def migrate_once(cl: Cluster, *, vm: str, memory: int, workload: str = "idle", prefill: str = "random",
                 downtime_ms: int | None = None, max_bandwidth_mibps: int | None = None,
                 probe: Callable[[Cluster], dict] | None = None) -> tuple[dict, dict, dict]:
    """Create ``vm`` on A, warm it up, migrate it to B, check it runs there, delete it.

    Returns (report, metrics, info). ``probe(cl)`` runs after the migration,
    while the VM is still on B (RSS readings). Raises BenchError when the
    migration did not complete (the report is attached as ``.report``).
    """
    a, b = cl.a, cl.b
    gib = memory / GiB
    a.call("vm.create", timeout_s=120.0 + 60.0 * gib, name=vm, memory=memory, workload=workload, prefill=prefill)
    t_created = time.monotonic()
    if workload != "idle":
        # The guest publishes its achieved rate once per ~1 s window: wait for the first one.
        _wait(lambda: a.call("vm.show", name=vm)["write_rate_pps"] > 0 and time.monotonic() - t_created >= 1.0,
              WARMUP_TIMEOUT_S, f"guest of {vm} to run for 1 s")
    before = a.call("vm.show", name=vm)
    t_before = time.time()
    args: dict[str, Any] = {"vm": vm, "to": b.addr, "wait": False}
    if downtime_ms is not None:
        args["downtime_ms"] = downtime_ms
    if max_bandwidth_mibps is not None:
        args["max_bandwidth_mibps"] = max_bandwidth_mibps
    job = a.call("migrate", **args)
    limit_s = 120.0 + 60.0 * gib
    if max_bandwidth_mibps:
        limit_s += 10.0 * memory / (max_bandwidth_mibps * MiB)
    try:
        report = a.call("job.wait", timeout_s=limit_s, id=job["id"])
    except (AgentError, OSError) as exc:
        try:
            a.call("cancel", timeout_s=60.0, id=job["id"])
        except (AgentError, OSError):
            pass
        raise BenchError(f"migration of {vm} did not end within {limit_s:.0f} s: {exc!r}") from exc
    info: dict[str, Any] = {"convergence": report.get("convergence"), "status": report.get("status"),
                            "workload": workload, "memory": size_label(memory)}
    metrics = report_metrics(report, before_writes=int(before.get("writes", 0)), t_before=t_before)
    metrics["workload_rate_pps"] = _nominal_rate(workload)
    if report.get("status") != "completed":
        if vm in {v["name"] for v in a.call("vm.list")}:
            a.call("vm.delete", timeout_s=30.0, name=vm)
        err = BenchError(f"migration of {vm} ended {report.get('status')}: {report.get('error')}")
        err.report = report           # type: ignore[attr-defined]
        raise err
    # The VM must run on B (and, unless idle, keep writing), and be gone from A.
    after = int(report.get("writes_after_resume") or 0)

    def dest_runs():
        v = b.call("vm.show", name=vm)
        return v["state"] == "running" and (workload == "idle" or v["writes"] > after)
    try:
        _wait(dest_runs, DEST_CHECK_TIMEOUT_S, f"{vm} to run on B")
        metrics["dest_running"] = True
    except BenchError:
        metrics["dest_running"] = False
    metrics["source_released"] = vm not in {v["name"] for v in a.call("vm.list")}
    if probe is not None:
        metrics.update(probe(cl))
    b.call("vm.delete", timeout_s=30.0, name=vm)
    return report, metrics, info


def report_metrics(r: dict, *, before_writes: int = 0, t_before: float | None = None) -> dict:
    """The numbers the benchmark reports, derived from one agent report (``Job.report()``)."""
    ph = r.get("phases") or {}
    precopy = float(ph.get("precopy", 0.0))
    stop_copy = float(ph.get("stop-and-copy", 0.0))
    transfer_ms = precopy + stop_copy
    ram = int(r.get("ram_bytes") or 0)
    sent = int(r.get("bytes_sent") or 0)
    total = float(r.get("total_ms") or 0.0)
    m: dict[str, Any] = {
        "total_ms": total,
        "downtime_ms": r.get("downtime_ms"),
        "rounds": r.get("iterations"),
        "bytes_sent": sent,
        "wire_bytes": r.get("wire_bytes"),
        "ram_bytes": ram,
        "pages_sent": r.get("pages_sent"),
        "zero_pages": r.get("zero_pages"),
        "sent_ratio": _r(sent / ram) if ram else None,
        "transfer_ms": _r(transfer_ms, 1),
        "precopy_ms": precopy,
        "stop_copy_ms": stop_copy,
        "setup_ms": _r(float(ph.get("negotiate", 0.0)) + float(ph.get("setup", 0.0)), 1),
        "prefault_ms": r.get("prefault_ms"),
        "verify_ms": r.get("verify_ms"),
        "resume_ms": ph.get("resume"),
        "commit_ms": ph.get("commit"),
        "throughput_gibps": _r(sent / (transfer_ms / 1000.0) / GiB) if transfer_ms > 0 else None,
        "effective_gibps": _r(ram / (total / 1000.0) / GiB) if total > 0 else None,
        "throttle_pct": r.get("throttle_pct"),
        "guest_rate_before_pps": r.get("guest_rate_before_pps"),
        "guest_rate_during_pps": r.get("guest_rate_during_pps"),
        "stop_copy_pages": r.get("stop_copy_pages"),
        "streams": r.get("streams"),              # negotiated data streams; None when the agent does not say
        "verified": bool(r.get("verified")),
    }
    # Bench-side average guest rate from migrate call to pause (covers the throttled rounds too).
    started, pause_w = r.get("started_at"), r.get("writes_at_pause")
    if t_before is not None and started and pause_w:
        t_pause = started + (float(ph.get("negotiate", 0.0)) + float(ph.get("setup", 0.0)) + precopy) / 1000.0
        if t_pause > t_before:
            m["guest_rate_avg_pps"] = round((int(pause_w) - before_writes) / (t_pause - t_before))
    return m


# ============================================================================ paired raw-TCP runs
# What each migration of idle-1g / hotset-1g is paired with, in this order, right before it:
PAIR_MODES: dict[str, rawtcp.Mode] = {
    "tcp": rawtcp.Mode(),                                    # the baseline's method: pre-faulted, 1 connection
    "e2e": rawtcp.Mode(fresh=True),                          # end to end: fresh destination memory, 1 connection
    "e2e_2conn": rawtcp.Mode(fresh=True, connections=2),     # the same over 2 connections (2 threads a side)
}
E2E_MODES = {k: PAIR_MODES[k] for k in ("e2e", "e2e_2conn")}


def paired_raw(ctx: Ctx, nbytes: int, modes: dict[str, rawtcp.Mode], tag: str = "pair") -> dict[str, dict]:
    """One raw-TCP run of ``nbytes`` in each of ``modes``, now (see PAIR_MODES)."""
    res = rawtcp.measure_modes(nbytes, modes, runs=1, prefix=f"{ctx.prefix}-{tag}")
    ctx.log("  raw TCP " + size_label(nbytes) + ": " + ", ".join(
        f"{k} {r['ms']['median']:.0f} ms = {r['gibps']['median']:.2f} GiB/s"
        + ("" if r["verified"] else " (NOT VERIFIED)") for k, r in res.items()))
    return res


def paired_summary(pair: dict[str, dict]) -> dict:
    """The compact record of the paired raw runs kept in a run's ``info``."""
    return {k: {"mode": r["mode"], "ms": r["ms"]["median"], "gibps": r["gibps"]["median"],
                "verified": r["verified"]} for k, r in pair.items()}


def paired_metrics(m: dict, pair: dict[str, dict]) -> dict:
    """A migration's figures against its paired raw runs (``rawtcp.measure_modes`` results, keys of PAIR_MODES).

    ``m`` needs ``throughput_gibps`` (ratios of rates) and/or ``total_ms``
    (ratios of times); a raw run that did not verify gives no figure.
    """
    out: dict[str, Any] = {}
    tp, total = m.get("throughput_gibps"), m.get("total_ms")

    def ok(key: str) -> dict | None:
        r = pair.get(key)
        return r if r is not None and r.get("verified") and r["gibps"]["median"] > 0 else None
    if (tcp := ok("tcp")) is not None:
        out["paired_tcp_gibps"] = _r(tcp["gibps"]["median"])
        if tp:
            out["ratio_to_tcp"] = _r(tp / tcp["gibps"]["median"])
    if (e2e := ok("e2e")) is not None:
        out["paired_e2e_ms"] = _r(e2e["ms"]["median"], 1)
        out["paired_e2e_gibps"] = _r(e2e["gibps"]["median"])
        if total:
            out["total_vs_e2e"] = _r(total / e2e["ms"]["median"])
    if (e2 := ok("e2e_2conn")) is not None:
        out["paired_tcp2_ms"] = _r(e2["ms"]["median"], 1)
        out["paired_tcp2_gibps"] = _r(e2["gibps"]["median"])
        if tp:
            out["ratio_to_tcp2"] = _r(tp / e2["gibps"]["median"])
        if total:
            out["total_vs_e2e_2conn"] = _r(total / e2["ms"]["median"])
    return out


# ============================================================================ scenarios
def _single(ctx: Ctx, *, memory: int, workload: str = "idle", prefill: str = "random",
            downtime_ms: int | None = None, max_bandwidth_mibps: int | None = None,
            tcp_ratio: bool = False) -> RunRecord:
    rec = RunRecord()
    pair: dict[str, dict] = {}
    if tcp_ratio:
        # The raw-TCP figures again, right before this run: this machine's speed
        # drifts between minutes (3.4-5.2 GiB/s seen), so a ratio against a
        # baseline taken minutes earlier measures the drift as much as the agent.
        # Pre-faulted 1 connection (the baseline's method), then end to end: fresh
        # destination memory over 1 and over 2 connections.
        pair = paired_raw(ctx, memory, PAIR_MODES)
        rec.info["paired_raw"] = paired_summary(pair)
    with _cluster(ctx) as cl:
        try:
            report, m, info = migrate_once(cl, vm="vm1", memory=memory, workload=workload, prefill=prefill,
                                           downtime_ms=downtime_ms, max_bandwidth_mibps=max_bandwidth_mibps)
        except Exception as exc:  # noqa: BLE001 - recorded with the agents' log tails, then cleaned up
            failed = getattr(exc, "report", None)
            if failed is not None:
                rec.reports.append(failed)
                rec.metrics = {"verified": bool(failed.get("verified"))}
            rec.error = f"{type(exc).__name__}: {exc}"
            rec.info["log_tail"] = cl.log_tails()
    rec.leaks = cl.leaks
    if rec.error is not None:
        return rec
    rec.reports.append(report)
    rec.info.update(info)
    if pair:
        m.update(paired_metrics(m, pair))
        if ctx.baseline and m.get("throughput_gibps"):
            m["ratio_to_baseline"] = _r(m["throughput_gibps"] / ctx.baseline["gibps"]["median"])
    rec.metrics = m
    rec.ok = True
    return rec


def scenario_idle_1g(ctx: Ctx) -> RunRecord:
    return _single(ctx, memory=ctx.cfg.size(GiB), prefill="random", tcp_ratio=True)


def scenario_zero_1g(ctx: Ctx) -> RunRecord:
    return _single(ctx, memory=ctx.cfg.size(GiB), prefill="none")


def scenario_hotset_1g(ctx: Ctx) -> RunRecord:
    ws = size_label(ctx.cfg.size(256 * MiB))
    return _single(ctx, memory=ctx.cfg.size(GiB), workload=f"hotset:ws={ws},rate=20000", prefill="random",
                   tcp_ratio=True)


def scenario_hotset_1g_hot(ctx: Ctx) -> RunRecord:
    ws = size_label(ctx.cfg.size(256 * MiB))
    rec = _single(ctx, memory=ctx.cfg.size(GiB), workload=f"hotset:ws={ws},rate=100000", prefill="random",
                  max_bandwidth_mibps=LINK_MIBPS)
    ram = ctx.cfg.size(GiB)
    budget_ms = 3 * ram / (LINK_MIBPS * MiB) * 1000.0
    rec.metrics["link_mibps"] = LINK_MIBPS
    rec.metrics["downtime_target_ms"] = DEFAULT_DOWNTIME_TARGET_MS
    rec.metrics["time_budget_ms"] = _r(budget_ms, 1)
    if rec.metrics.get("total_ms"):
        rec.metrics["total_vs_budget"] = _r(rec.metrics["total_ms"] / budget_ms)
    return rec


def scenario_scale(ctx: Ctx) -> RunRecord:
    sizes = [ctx.cfg.size(256 * MiB), ctx.cfg.size(GiB), ctx.cfg.size(4 * GiB)]
    rec = RunRecord()
    per_size: list[dict] = []

    def rss_probe(cl: Cluster) -> dict:
        out: dict[str, Any] = {}
        for role, ag in (("src", cl.a), ("dst", cl.b)):
            st = ag.call("status")
            mem = _proc_mem(ag.proc.pid) if ag.proc is not None else {}
            out[f"{role}_rss_bytes"] = st.get("rss_bytes")
            if "RssShmem" in mem:
                out[f"{role}_rss_shmem_bytes"] = mem["RssShmem"]
                out[f"{role}_rss_noguest_bytes"] = mem.get("RssAnon", 0) + mem.get("RssFile", 0)
                out[f"{role}_hwm_bytes"] = mem.get("VmHWM")
        return out

    e2e_ms: list[float | None] = []
    with _cluster(ctx) as cl:
        try:
            for i, size in enumerate(sizes):
                last = i == len(sizes) - 1
                ctx.log(f"  scale: {size_label(size)}")
                # End to end raw TCP of the same size (fresh destination, 1 connection), right before it.
                raw = paired_raw(ctx, size, {"e2e": E2E_MODES["e2e"]}, tag=f"e2e{i}")["e2e"]
                e2e_ms.append(raw["ms"]["median"] if raw["verified"] else None)
                report, m, _ = migrate_once(cl, vm=f"vm{i}", memory=size, prefill="random",
                                            probe=rss_probe if last else None)
                rec.reports.append(report)
                per_size.append({"memory": size_label(size), **m})
        except Exception as exc:  # noqa: BLE001 - recorded with the agents' log tails, then cleaned up
            if getattr(exc, "report", None) is not None:
                rec.reports.append(exc.report)   # type: ignore[attr-defined]
            rec.error = f"{type(exc).__name__}: {exc}"
            rec.info["log_tail"] = cl.log_tails()
    rec.leaks = cl.leaks
    for p, e in zip(per_size, e2e_ms):
        p["e2e_ms"] = e
    rec.info["sizes"] = [{k: p.get(k) for k in ("memory", "total_ms", "e2e_ms", "downtime_ms", "rounds",
                                                  "throughput_gibps", "transfer_ms", "setup_ms", "verify_ms",
                                                  "streams", "verified")}
                         for p in per_size]
    m: dict[str, Any] = {}
    for p in per_size:
        lab = p["memory"].lower()
        m[f"total_ms_{lab}"] = p["total_ms"]
        m[f"e2e_ms_{lab}"] = p.get("e2e_ms")
        m[f"throughput_gibps_{lab}"] = p.get("throughput_gibps")
    if per_size:
        big = per_size[-1]
        for k in ("total_ms", "downtime_ms", "rounds", "bytes_sent", "ram_bytes", "sent_ratio", "throughput_gibps",
                  "throttle_pct", "transfer_ms", "setup_ms", "prefault_ms", "verify_ms", "guest_rate_before_pps",
                  "guest_rate_during_pps", "src_rss_bytes", "dst_rss_bytes", "src_rss_noguest_bytes",
                  "dst_rss_noguest_bytes", "src_rss_shmem_bytes", "dst_rss_shmem_bytes", "src_hwm_bytes",
                  "dst_hwm_bytes", "streams"):
            if k in big:
                m[k] = big[k]
        if ctx.baseline and big.get("throughput_gibps"):
            m["ratio_to_tcp"] = _r(big["throughput_gibps"] / ctx.baseline["gibps"]["median"])
        if big.get("e2e_ms") and big.get("total_ms"):       # the largest size against its own e2e raw run
            m["total_vs_e2e"] = _r(big["total_ms"] / big["e2e_ms"])
    if len(per_size) == len(sizes):
        m.update(scale_fit([s / GiB for s in sizes], [p["total_ms"] for p in per_size],
                           [p.get("setup_ms") or 0 for p in per_size], e2e_ms))
        m["verified"] = all(p.get("verified") for p in per_size)
        rec.ok = True
    else:
        m["verified"] = False
    rec.metrics = m
    return rec


def scale_fit(gibs: list[float], totals: list[float], setups: list[float], e2e_ms: list[float | None]) -> dict:
    """``scale``'s fits: total vs GiB (with setup, and without), the e2e raw-TCP time vs GiB, and the ratio
    of the slopes (``slope_vs_e2e``: the migration's slope, setup included, / the raw e2e slope)."""
    slope, icpt, r2 = linear_fit(gibs, totals)
    out: dict[str, Any] = {"slope_ms_per_gib": _r(slope, 1), "intercept_ms": _r(icpt, 1), "r2": _r(r2)}
    # The same fit without setup (negotiation + the destination's pre-fault, whose cost on this VM
    # depends on whether the hypervisor already backs the pages): the data path alone.
    slope2, _, r2b = linear_fit(gibs, [t - s for t, s in zip(totals, setups)])
    out.update(slope_nosetup_ms_per_gib=_r(slope2, 1), r2_nosetup=_r(r2b))
    if len(e2e_ms) == len(gibs) and all(e is not None for e in e2e_ms):
        es, ei, er2 = linear_fit(gibs, e2e_ms)
        out.update(e2e_slope_ms_per_gib=_r(es, 1), e2e_intercept_ms=_r(ei, 1), e2e_r2=_r(er2))
        if es > 0:
            out["slope_vs_e2e"] = _r(slope / es)
    return out


DRAIN_VMS = 8
DRAIN_LIMIT = 2
DRAIN_WORKLOAD = "uniform:rate=500"


def _max_overlap(reports: list[dict]) -> int:
    """Most migrations that ran at once, from their started_at/finished_at stamps."""
    events = []
    for r in reports:
        if r.get("started_at") and r.get("finished_at"):
            events += [(r["started_at"], 1), (r["finished_at"], -1)]
    cur = best = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        cur += d
        best = max(best, cur)
    return best


_DRAIN_RUN = itertools.count()


def _drain(src: AgentProcess, dst: AgentProcess) -> tuple[dict, float, list[dict]]:
    t0 = time.monotonic()
    dr = src.call("drain", timeout_s=None, to=[dst.addr], wait=True)
    wall_ms = (time.monotonic() - t0) * 1000.0
    src.call("undrain")
    return dr, wall_ms, [src.call("job.show", id=v["id"]) for v in dr["vms"]]


def scenario_drain(ctx: Ctx) -> RunRecord:
    """8 VMs of 256 MiB, light workload, limit 2 on both hosts: the same VMs moved one at a
    time between A and B, and drained (2 at once) the other way; the drain must not be
    slower. The order alternates between runs."""
    size = ctx.cfg.size(256 * MiB)
    rec = RunRecord()
    # The same bytes end to end over raw TCP (fresh destination; 1 and 2 connections), before the agents start.
    pair = paired_raw(ctx, DRAIN_VMS * size, E2E_MODES, tag="e2e")
    rec.info["paired_raw"] = paired_summary(pair)
    with _cluster(ctx) as cl:
        a, b = cl.a, cl.b
        try:
            for ag in (a, b):
                ag.call("config.set", key="max-live-migrations", value=str(DRAIN_LIMIT))
            names = [f"vm{i}" for i in range(DRAIN_VMS)]
            for n in names:
                a.call("vm.create", timeout_s=120.0, name=n, memory=size, workload=DRAIN_WORKLOAD, prefill="random")
            # Which direction goes first alternates between runs, so neither way
            # always meets the other's freshly freed (or never touched) memory.
            drain_first = next(_DRAIN_RUN) % 2 == 1
            src, dst = (a, b)
            if drain_first:
                ctx.log(f"  drain: {DRAIN_VMS} x {size_label(size)}, A -> B, limit {DRAIN_LIMIT}")
                dr, drain_wall_ms, drained = _drain(a, b)
                src, dst = b, a
            ctx.log(f"  drain: {DRAIN_VMS} x {size_label(size)}, one at a time {src.name} -> {dst.name}")
            t0 = time.monotonic()
            seq = [src.call("migrate", timeout_s=None, vm=n, to=dst.addr, wait=True) for n in names]
            seq_ms = (time.monotonic() - t0) * 1000.0
            rec.reports.extend(seq)
            if not all(r["status"] == "completed" for r in seq):
                raise BenchError(f"sequential migrations: {[r['status'] for r in seq]}")
            if not drain_first:
                ctx.log(f"  drain: B -> A, limit {DRAIN_LIMIT}")
                dr, drain_wall_ms, drained = _drain(b, a)
            rec.reports.extend(drained)
            rec.info["order"] = "drain first" if drain_first else "one at a time first"
            ok = dr["status"] == "completed" and len(drained) == DRAIN_VMS
            rec.ok = ok
            if not ok:
                rec.error = f"drain {dr['status']}: {[(v['vm'], v['status'], v['error']) for v in dr['vms']]}"
            rec.metrics = {
                "total_ms": _r(dr["drain_ms"], 1),
                "drain_ms": _r(dr["drain_ms"], 1),
                "drain_wall_ms": _r(drain_wall_ms, 1),
                "sequential_ms": _r(seq_ms, 1),
                "ratio_to_sequential": _r(dr["drain_ms"] / seq_ms),
                "max_concurrent": _max_overlap(drained),
                "bytes_sent": sum(r["bytes_sent"] for r in drained),
                "ram_bytes": sum(r["ram_bytes"] for r in drained),
                "downtime_ms": max((r["downtime_ms"] for r in drained), default=None),
                "streams": max((r["streams"] for r in drained if r.get("streams") is not None), default=None),
                "verified": all(r["verified"] for r in drained) and all(r["verified"] for r in seq),
            }
            rec.metrics.update(paired_metrics({"total_ms": dr["drain_ms"]}, pair))
            rec.info["vms"] = [{k: v.get(k) for k in ("vm", "destination", "status", "total_ms", "downtime_ms")}
                               for v in dr["vms"]]
        except Exception as exc:  # noqa: BLE001 - recorded with the agents' log tails, then cleaned up
            rec.error = f"{type(exc).__name__}: {exc}"
            rec.info["log_tail"] = cl.log_tails()
    rec.leaks = cl.leaks
    return rec


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    run: Callable[[Ctx], RunRecord]
    config: Callable[[BenchConfig], dict]


SCENARIOS: dict[str, Scenario] = {
    "idle-1g": Scenario(
        "idle-1g", "1 GiB of incompressible data, guest idle: payload throughput vs raw TCP", scenario_idle_1g,
        lambda c: {"memory": size_label(c.size(GiB)), "workload": "idle", "prefill": "random"}),
    "zero-1g": Scenario(
        "zero-1g", "1 GiB never written: zero pages announced, not sent", scenario_zero_1g,
        lambda c: {"memory": size_label(c.size(GiB)), "workload": "idle", "prefill": "none"}),
    "hotset-1g": Scenario(
        "hotset-1g", "1 GiB, guest dirtying 20k pages/s in 256 MiB: convergence, downtime", scenario_hotset_1g,
        lambda c: {"memory": size_label(c.size(GiB)), "prefill": "random",
                   "workload": f"hotset:ws={size_label(c.size(256 * MiB))},rate=20000"}),
    "hotset-1g-hot": Scenario(
        "hotset-1g-hot", "1 GiB, 100k pages/s in 256 MiB over a 119 MiB/s (~1 Gbit/s) cap: auto-converge",
        scenario_hotset_1g_hot,
        lambda c: {"memory": size_label(c.size(GiB)), "prefill": "random",
                   "workload": f"hotset:ws={size_label(c.size(256 * MiB))},rate=100000",
                   "max_bandwidth_mibps": LINK_MIBPS, "downtime_target_ms": DEFAULT_DOWNTIME_TARGET_MS}),
    "scale": Scenario(
        "scale", "idle VMs of 256 MiB, 1 GiB, 4 GiB: total time vs size, agent RSS", scenario_scale,
        lambda c: {"sizes": [size_label(c.size(s)) for s in (256 * MiB, GiB, 4 * GiB)], "workload": "idle",
                   "prefill": "random"}),
    "drain": Scenario(
        "drain", "8 VMs of 256 MiB, limit 2: drain time vs the same VMs moved one at a time", scenario_drain,
        lambda c: {"vms": DRAIN_VMS, "memory": size_label(c.size(256 * MiB)), "workload": DRAIN_WORKLOAD,
                   "prefill": "random", "max_live_migrations": DRAIN_LIMIT}),
}


def aggregate(scen: Scenario, cfg: BenchConfig, runs: list[RunRecord]) -> dict:
    """One object per scenario: {median,min,max,n} for every numeric metric, plus verdicts and raw runs."""
    ok_runs = [r for r in runs if r.ok]
    keys: list[str] = []
    for r in ok_runs:
        for k, v in r.metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    out: dict[str, Any] = {
        "name": scen.name,
        "what": scen.what,
        "config": scen.config(cfg),
        "runs_requested": len(runs),
        "runs_completed": len(ok_runs),
        "completed": len(ok_runs) == len(runs) and bool(runs),
        "verified": bool(runs) and all(r.ok and r.metrics.get("verified") for r in runs),
        "errors": [r.error for r in runs if r.error],
        "leaks": [x for r in runs for x in r.leaks],
    }
    for k in keys:
        out[k] = summarize(r.metrics.get(k) for r in ok_runs)
    # The agents' negotiated data streams: optional in a report (null when no run's report has it).
    out.setdefault("streams", summarize(r.metrics.get("streams") for r in ok_runs))
    for k in ("dest_running", "source_released"):         # checks: true in every completed run
        vals = [r.metrics.get(k) for r in ok_runs if k in r.metrics]
        if vals:
            out[k] = all(vals)
    out["runs"] = [r.as_dict() for r in runs]
    return out


def post_process(results: dict[str, dict]) -> None:
    """Cross-scenario figures, computed after every scenario ran."""
    z, idle = results.get("zero-1g"), results.get("idle-1g")
    if z is not None:
        idle_total = (idle or {}).get("total_ms")
        ratios = []
        for run in z["runs"]:
            if run["ok"] and idle_total:
                run["metrics"]["ratio_to_idle_total"] = _r(run["metrics"]["total_ms"] / idle_total["median"])
                ratios.append(run["metrics"]["ratio_to_idle_total"])
        z["ratio_to_idle_total"] = summarize(ratios)


# ============================================================================ targets (issues 3 and 12)
def _med(field_: str, agg: str = "median"):
    def f(res: dict):
        s = res.get(field_)
        return None if s is None else s[agg]
    return f


def _frac(flag: str | None):
    """Share of the requested runs that completed (and, with ``flag``, have that metric true)."""
    def f(res: dict):
        n = res.get("runs_requested") or 0
        if not n:
            return None
        return sum(1 for r in res["runs"] if r["ok"] and (flag is None or r["metrics"].get(flag))) / n
    return f


@dataclass(frozen=True)
class Target:
    scenario: str
    text: str
    measure: Callable[[dict], float | None]
    op: str                                    # "<=" or ">="
    threshold: float | Callable[[dict], float | None]
    fmt: str = "{:.2f}"
    moonshot: bool = False
    issue: int = 3                             # the issue that set it


def _hot_budget(res: dict):
    s = res.get("time_budget_ms")
    return None if s is None else s["median"]


TARGETS: list[Target] = [
    Target("idle-1g", "total <= 1.2 x paired e2e raw TCP (total_vs_e2e, median)", _med("total_vs_e2e"), "<=", 1.2,
           issue=12),
    Target("idle-1g", "one stream: transfer rate >= 0.9 x paired raw TCP, 1 conn pre-faulted (ratio_to_tcp, median)",
           _med("ratio_to_tcp"), ">=", 0.9, issue=12),
    Target("idle-1g", "with parallel streams: transfer rate >= 1.0 x paired raw TCP, 1 conn (ratio_to_tcp, median)",
           _med("ratio_to_tcp"), ">=", 1.0, issue=12),
    Target("zero-1g", "total time <= 10% of idle-1g total (medians)", _med("ratio_to_idle_total"), "<=", 0.10,
           fmt="{:.1%}"),
    Target("hotset-1g", "downtime median <= 10 ms", _med("downtime_ms"), "<=", 10.0, fmt="{:.1f} ms", issue=12),
    Target("hotset-1g", "downtime <= 20 ms in every run (max)", _med("downtime_ms", "max"), "<=", 20.0,
           fmt="{:.1f} ms", issue=12),
    Target("hotset-1g", "verified in every run", _frac("verified"), ">=", 1.0, fmt="{:.0%} of runs"),
    Target("hotset-1g", "bytes sent <= 1.2 x RAM (median)", _med("sent_ratio"), "<=", 1.2, fmt="{:.3f} x RAM"),
    Target("hotset-1g", "converges in <= 5 rounds (median, incl. stop-and-copy round)", _med("rounds"), "<=", 5,
           fmt="{:.0f} rounds"),
    Target("hotset-1g-hot", "completes every time", _frac(None), ">=", 1.0, fmt="{:.0%} of runs"),
    Target("hotset-1g-hot", "downtime <= 300 ms target in every run (max)", _med("downtime_ms", "max"), "<=",
           float(DEFAULT_DOWNTIME_TARGET_MS), fmt="{:.1f} ms"),
    Target("hotset-1g-hot", "total time <= 3 x RAM / link rate (median)", _med("total_ms"), "<=", _hot_budget,
           fmt="{:.0f} ms"),
    Target("scale", "R² of total time (incl. setup) vs size >= 0.99 (median)", _med("r2"), ">=", 0.99,
           fmt="{:.4f}", issue=12),
    Target("scale", "slope (incl. setup) <= 1.2 x e2e raw TCP slope (slope_vs_e2e, median)", _med("slope_vs_e2e"),
           "<=", 1.2, issue=12),
    Target("drain", "2 at once not slower than one at a time (drain / sequential, median)",
           _med("ratio_to_sequential"), "<=", 1.0, fmt="{:.2f}"),
    Target("drain", "every VM completed and verified", _frac("verified"), ">=", 1.0, fmt="{:.0%} of runs"),
    Target("scale", "source agent RSS w/o guest memory <= 100 MiB at 4 GiB", _med("src_rss_noguest_bytes"),
           "<=", 100 * MiB, fmt="{:,.0f} B"),
    Target("scale", "destination agent RSS w/o guest memory <= 100 MiB at 4 GiB",
           _med("dst_rss_noguest_bytes"), "<=", 100 * MiB, fmt="{:,.0f} B"),
]


def _fmt_val(fmt: str, v: float) -> str:
    if fmt == "{:,.0f} B":
        return f"{v / MiB:.1f} MiB"
    return fmt.format(v)


def evaluate_targets(results: dict[str, dict], targets: list[Target] | None = None) -> list[dict]:
    """PASS / MISS (or NOT RUN) for every target, with the measured figure; never assumed."""
    out = []
    for t in targets if targets is not None else TARGETS:
        row: dict[str, Any] = {"scenario": t.scenario, "target": t.text, "moonshot": t.moonshot, "issue": t.issue,
                               "measured": None, "threshold": None, "shown": ""}
        res = results.get(t.scenario)
        if res is None:
            row["status"] = "NOT RUN"
            row["shown"] = "scenario not selected"
            out.append(row)
            continue
        thr = t.threshold(res) if callable(t.threshold) else t.threshold
        v = t.measure(res)
        row["threshold"] = thr
        row["measured"] = v
        if v is None or thr is None:
            row["status"] = "MISS"
            errs = res.get("errors") or []
            row["shown"] = "no figure" + (f" ({errs[0][:100]})" if errs else "")
        else:
            ok = v <= thr if t.op == "<=" else v >= thr
            row["status"] = "PASS" if ok else "MISS"
            row["shown"] = f"{_fmt_val(t.fmt, v)} (target {t.op} {_fmt_val(t.fmt, thr)})"
        out.append(row)
    return out


# ============================================================================ machine facts
def machine_facts() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def ver(mod: str) -> str:
        try:
            from importlib.metadata import version
            return version(mod)
        except Exception:  # noqa: BLE001
            return "absent"

    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return "?"

    git = "?"
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        git = head + (" (modified)" if dirty else "") if head else "?"
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "mem_total_gib": round(psutil.virtual_memory().total / GiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": ver("uvloop"),
        "msgpack": ver("msgpack"),
        "xxhash": ver("xxhash"),
        "shmem_thp": read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
        "loadavg_start": read("/proc/loadavg"),
        "git": git,
    }


class CpuMeter:
    """CPU used by processes other than the bench and its (reaped) descendants, in cores, over an interval.

    /proc/stat busy time (user+nice+system+irq+softirq) minus our own rusage
    (self + reaped children: agents, their guests, the raw-TCP processes).
    Every figure here is a 2-core figure: another busy process skews it.
    """

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0, self.steal0 = self._stat()
        self.own0 = self._own()

    @staticmethod
    def _stat() -> tuple[float, float]:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return 0.0, 0.0
        hz = os.sysconf("SC_CLK_TCK")
        busy = v[0] + v[1] + v[2] + v[5] + v[6]
        steal = v[7] if len(v) > 7 else 0
        return busy / hz, steal / hz

    @staticmethod
    def _own() -> float:
        import resource
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def read(self) -> dict:
        wall = max(time.monotonic() - self.t0, 1e-6)
        busy, steal = self._stat()
        own = self._own() - self.own0
        return {"wall_s": round(wall, 2), "own_cores": round(own / wall, 2),
                "foreign_cores": round(max(0.0, (busy - self.busy0) - own) / wall, 2),
                "steal_cores": round((steal - self.steal0) / wall, 2)}


FOREIGN_WARN_CORES = 0.15


def foreign_cpu(sample_s: float = 0.5) -> list[dict]:
    """Processes (not ours) using > 5% of a core over a short sample: the machine should be quiet."""
    me = os.getpid()
    procs = []
    for p in psutil.process_iter(["pid", "name"]):
        try:
            if p.pid != me:
                p.cpu_percent(None)
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    time.sleep(sample_s)
    busy = []
    for p in procs:
        try:
            c = p.cpu_percent(None)
            if c > 5.0:
                busy.append({"pid": p.pid, "name": p.info["name"], "cpu_pct": round(c, 1)})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return sorted(busy, key=lambda d: -d["cpu_pct"])


# ============================================================================ output
def _cell(s: dict | None, fmt: str = "{:.0f}", scale: float = 1.0) -> str:
    if not s:
        return "-"
    med = fmt.format(s["median"] * scale)
    if s.get("n", 1) <= 1 or s["min"] == s["max"]:
        return med
    return f"{med} [{fmt.format(s['min'] * scale)}-{fmt.format(s['max'] * scale)}]"


def _rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    head = ["scenario", "done", "total ms", "downtime ms", "rounds", "sent/RAM", "GiB/s", "ratio TCP",
            "ratio TCP2", "total/e2e", "streams", "guest pps before/during/avg", "throttle %", "verified"]
    rows = []
    for name, s in doc["scenarios"].items():
        rate = "/".join(_cell(s.get(k)) for k in ("guest_rate_before_pps", "guest_rate_during_pps",
                                                  "guest_rate_avg_pps"))
        rows.append([
            name, f"{s['runs_completed']}/{s['runs_requested']}", _cell(s.get("total_ms")),
            _cell(s.get("downtime_ms"), "{:.1f}"), _cell(s.get("rounds")), _cell(s.get("sent_ratio"), "{:.3f}"),
            _cell(s.get("throughput_gibps"), "{:.2f}"), _cell(s.get("ratio_to_tcp"), "{:.2f}"),
            _cell(s.get("ratio_to_tcp2"), "{:.2f}"), _cell(s.get("total_vs_e2e"), "{:.2f}"), _cell(s.get("streams")),
            rate,
            _cell(s.get("throttle_pct")), "yes" if s["verified"] else "NO",
        ])
    return head, rows


def _details(doc: dict) -> list[str]:
    out = []
    sc = doc["scenarios"]
    for name, s in sc.items():
        if s["errors"]:
            out.append(f"{name}: ERROR in {len(s['errors'])} run(s): {s['errors'][0]}")
        if s.get("dest_running") is False:
            out.append(f"{name}: WARNING: after a completed migration the VM did not run (or write) on B")
        if s.get("source_released") is False:
            out.append(f"{name}: WARNING: after a completed migration A still listed the VM")
        if not s.get("total_ms"):
            continue
        common = (f"setup {_cell(s.get('setup_ms'))} ms (prefault {_cell(s.get('prefault_ms'))}), "
                  f"transfer {_cell(s.get('transfer_ms'))} ms, verify {_cell(s.get('verify_ms'))} ms")
        if name in ("idle-1g", "hotset-1g") and s.get("paired_e2e_ms"):
            out.append(f"{name}: paired raw TCP right before each run: pre-faulted 1 conn "
                       f"{_cell(s.get('paired_tcp_gibps'), '{:.2f}')} GiB/s; e2e (fresh destination) 1 conn "
                       f"{_cell(s.get('paired_e2e_ms'))} ms = {_cell(s.get('paired_e2e_gibps'), '{:.2f}')} GiB/s, "
                       f"2 conn {_cell(s.get('paired_tcp2_ms'))} ms = {_cell(s.get('paired_tcp2_gibps'), '{:.2f}')} "
                       f"GiB/s; total / e2e {_cell(s.get('total_vs_e2e'), '{:.2f}')} (2 conn "
                       f"{_cell(s.get('total_vs_e2e_2conn'), '{:.2f}')}), rate / 2-conn rate "
                       f"{_cell(s.get('ratio_to_tcp2'), '{:.2f}')}")
        if name == "idle-1g":
            out.append(f"idle-1g: {common}; end-to-end {_cell(s.get('effective_gibps'), '{:.2f}')} GiB/s")
        elif name == "zero-1g":
            out.append(f"zero-1g: {common}; pages sent {_cell(s.get('pages_sent'))}, zero pages announced "
                       f"{_cell(s.get('zero_pages'))}; total = {_cell(s.get('ratio_to_idle_total'), '{:.1%}')} "
                       f"of idle-1g total")
        elif name == "hotset-1g":
            out.append(f"hotset-1g: {common}; stop-and-copy {_cell(s.get('stop_copy_ms'), '{:.1f}')} ms "
                       f"({_cell(s.get('stop_copy_pages'))} pages)")
        elif name == "hotset-1g-hot":
            conv = sorted({r["info"].get("convergence") or "-" for r in s["runs"] if r["ok"]})
            out.append(f"hotset-1g-hot: throttle reached {_cell(s.get('throttle_pct'))} %, total "
                       f"{_cell(s.get('total_ms'))} ms vs budget {_cell(s.get('time_budget_ms'))} ms "
                       f"(3 x RAM / {LINK_MIBPS} MiB/s) = {_cell(s.get('total_vs_budget'), '{:.2f}')}; "
                       f"convergence {', '.join(conv)}")
        elif name == "scale":
            sizes = [k for k in s if k.startswith("total_ms_")]
            per = ", ".join(f"{k[len('total_ms_'):].upper()} {_cell(s[k])} ms" for k in sizes)
            out.append(f"scale: {per}; slope {_cell(s.get('slope_ms_per_gib'))} ms/GiB, intercept "
                       f"{_cell(s.get('intercept_ms'))} ms, R² {_cell(s.get('r2'), '{:.4f}')}; without setup: "
                       f"slope {_cell(s.get('slope_nosetup_ms_per_gib'))} ms/GiB, "
                       f"R² {_cell(s.get('r2_nosetup'), '{:.4f}')}")
            e2e = ", ".join(f"{k[len('e2e_ms_'):].upper()} {_cell(s[k])} ms" for k in s if k.startswith("e2e_ms_"))
            out.append(f"scale: e2e raw TCP (fresh destination, 1 conn) {e2e or '-'}: slope "
                       f"{_cell(s.get('e2e_slope_ms_per_gib'))} ms/GiB; migration slope (incl. setup) / e2e slope "
                       f"{_cell(s.get('slope_vs_e2e'), '{:.2f}')}")
            out.append(f"scale: agent RSS after the largest migration, without guest memory (anon+file): "
                       f"source {_cell(s.get('src_rss_noguest_bytes'), '{:.1f}', 1 / MiB)} MiB, destination "
                       f"{_cell(s.get('dst_rss_noguest_bytes'), '{:.1f}', 1 / MiB)} MiB; `status` rss_bytes "
                       f"(incl. mapped guest memory): source {_cell(s.get('src_rss_bytes'), '{:.1f}', 1 / MiB)} "
                       f"MiB, destination {_cell(s.get('dst_rss_bytes'), '{:.1f}', 1 / MiB)} MiB")
        elif name == "drain":
            out.append(f"drain: {DRAIN_VMS} VMs, limit {DRAIN_LIMIT}: drain {_cell(s.get('drain_ms'))} ms vs one at "
                       f"a time {_cell(s.get('sequential_ms'))} ms = {_cell(s.get('ratio_to_sequential'), '{:.2f}')};"
                       f" at most {_cell(s.get('max_concurrent'))} ran at once; vs e2e raw TCP of the same "
                       f"{_cell(s.get('ram_bytes'), '{:.0f}', 1 / MiB)} MiB: 1 conn {_cell(s.get('paired_e2e_ms'))} ms "
                       f"(total / e2e {_cell(s.get('total_vs_e2e'), '{:.2f}')}), 2 conn "
                       f"{_cell(s.get('paired_tcp2_ms'))} ms ({_cell(s.get('total_vs_e2e_2conn'), '{:.2f}')})")
        else:
            out.append(f"{name}: {common}")
    return out


def _header(doc: dict) -> list[str]:
    m = doc["machine"]
    b = doc.get("baseline")
    lines = [
        f"livemig bench {doc['started_at']}  ({doc['mode']}, {doc['runs']} run(s) per scenario, "
        f"took {doc['duration_s']:.0f} s)",
        f"machine: {m['cpu_count']} x {m['cpu_model']}, {m['mem_total_gib']} GiB, kernel {m['kernel']}, "
        f"Python {m['python']}, uvloop {m['uvloop']}, git {m['git']}",
    ]
    if doc.get("foreign_cpu"):
        lines.append("WARNING: other processes were busy at start: " +
                     ", ".join(f"{p['name']}({p['pid']}) {p['cpu_pct']}%" for p in doc["foreign_cpu"][:5]))
    loads = [(n, s["cpu"]["foreign_cores"]) for n, s in doc.get("scenarios", {}).items() if "cpu" in s]
    if b and "cpu" in b:
        loads.insert(0, ("baseline", b["cpu"]["foreign_cores"]))
    if loads:
        busy = [f"{n} {c:.2f}" for n, c in loads if c > FOREIGN_WARN_CORES]
        lines.append("CPU used by other processes (cores): " + ", ".join(f"{n} {c:.2f}" for n, c in loads) +
                     (f"  -- WARNING: machine not quiet during {', '.join(n for n, c in loads if c > FOREIGN_WARN_CORES)}"
                      if busy else ""))
    if b and "gibps" in b:
        g = b["gibps"]
        lines.append(f"baseline raw TCP: {b['bytes'] / MiB:.0f} MiB, {b['method']}: {g['median']:.2f} GiB/s "
                     f"[{g['min']:.2f}-{g['max']:.2f}] ({b['runs']} runs, verified={b['verified']})")
    elif b:
        lines.append(f"baseline raw TCP: FAILED {b.get('error')}")
    st = doc.get("streams")
    shown = "their default" if st is None else "auto (0)" if st == 0 else str(st)
    lines.append(f"agents' migration.streams: {shown}; paired raw TCP per run: pre-faulted 1 conn, "
                 "e2e (fresh destination) 1 conn and 2 conn")
    return lines


def format_table(doc: dict) -> str:
    head, rows = _rows(doc)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = _header(doc) + [""]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines += ["", "median [min-max] over runs; GiB/s = payload bytes / (precopy + stop-and-copy);",
              "ratio TCP / TCP2 = GiB/s / raw TCP right before (1 conn pre-faulted / 2 conn fresh destination);",
              "total/e2e = total / raw TCP of the same bytes into fresh memory, 1 conn;",
              "guest pps: agent's 1 s window before / during (at pause), and bench average migrate->pause", ""]
    lines += _details(doc)
    lines += ["", "targets (issues 3 and 12):"]
    for t in doc["targets"]:
        lines.append(f"  {t['status']:<7} {t['scenario']:<14} #{t.get('issue', 3):<3} {t['target']}: {t['shown']}")
    if doc["errors"]:
        lines += ["", "errors:"] + [f"  {e}" for e in doc["errors"]]
    return "\n".join(lines)


def format_markdown(doc: dict) -> str:
    head, rows = _rows(doc)
    lines = [f"# livemig bench {doc['started_at']}", ""]
    lines += [f"- {x}" for x in _header(doc)[1:]]
    lines += [f"- mode: {doc['mode']}, {doc['runs']} run(s) per scenario, agents {doc.get('security', 'tls')}, "
              f"took {doc['duration_s']:.0f} s", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Cells: median [min-max] over runs. GiB/s = payload bytes / (precopy + stop-and-copy). "
              "Ratio TCP / TCP2: that rate / a raw-TCP run right before the migration (1 connection pre-faulted / "
              "2 connections, fresh destination); total/e2e: total time / a fresh 1-connection raw run of the same "
              "bytes. Guest pps: the guest's own 1 s rate before the migration / at the pause, and the bench's "
              "average from the migrate call to the pause.", ""]
    lines += [f"- {d}" for d in _details(doc)]
    lines += ["", "## Targets (issues 3 and 12)", "", "| status | scenario | issue | target | measured |",
              "|---|---|---|---|---|"]
    lines += [f"| {t['status']} | {t['scenario']} | {t.get('issue', 3)} | {t['target']} | {t['shown']} |"
              for t in doc["targets"]]
    if doc["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in doc["errors"]]
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict, out_dir: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    stamp = doc["started_at"].replace("-", "").replace(":", "").replace("T", "-")
    js = os.path.join(out_dir, f"bench-{stamp}.json")
    md = os.path.join(out_dir, f"bench-{stamp}.md")
    text_js = json.dumps(doc, indent=1, default=str) + "\n"
    text_md = format_markdown(doc)
    for path, text in ((js, text_js), (md, text_md), (os.path.join(out_dir, "latest.json"), text_js),
                       (os.path.join(out_dir, "latest.md"), text_md)):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return js, md


# ============================================================================ runner
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livemig bench", description="Benchmark real migrations between two "
                                "local agents against a raw-TCP baseline measured in the same run.")
    p.add_argument("--quick", action="store_true", help="1 run per scenario (default 3), 3 baseline runs")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--out", default="bench-results", metavar="DIR",
                   help="where bench-<timestamp>.json/.md and latest.json/.md go (default bench-results/)")
    p.add_argument("--only", default="", metavar="SCEN,...", help=f"scenarios to run: {', '.join(SCENARIOS)}")
    p.add_argument("--runs", type=int, help="runs per scenario (default 3; 1 with --quick)")
    p.add_argument("--tcp-runs", type=int, help="raw-TCP baseline runs (default 5; 3 with --quick)")
    p.add_argument("--shm-prefix", default="", help="base of the /dev/shm names used (default livemig-bench-<random>)")
    p.add_argument("--verify", choices=("incremental", "full"), default="incremental",
                   help="the agents' migration.verify (full: every page rehashed at the pause)")
    p.add_argument("--security", choices=("tls", "insecure"), default="tls",
                   help="the agents' security.mode: tls (default, mutual TLS with a throwaway CA) or insecure "
                        "(no TLS; to measure what TLS costs)")
    p.add_argument("--streams", metavar="N|auto", default=None,
                   help="the agents' migration.streams: N data streams per migration, or auto (0); default: "
                        "not set, the agents' own default")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)   # tests: sizes / 16, 1 run
    return p


def config_from_args(ns: argparse.Namespace) -> BenchConfig:
    only = tuple(s.strip() for s in ns.only.split(",") if s.strip())
    unknown = [s for s in only if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    quick = ns.quick or ns.tiny
    runs = ns.runs if ns.runs is not None else (1 if quick else 3)
    tcp_runs = ns.tcp_runs if ns.tcp_runs is not None else (1 if ns.tiny else 3 if quick else 5)
    if runs < 1 or tcp_runs < 1:
        raise ValueError("--runs and --tcp-runs: >= 1")
    base = ns.shm_prefix or f"livemig-bench-{secrets.token_hex(3)}"
    if len(base) > 52 or not all(c.isalnum() or c in "-_" for c in base):
        raise ValueError("--shm-prefix: up to 52 of A-Z a-z 0-9 _ -")
    divisor = TINY_DIVISOR if ns.tiny else 1
    return BenchConfig(runs=runs, quick=quick, divisor=divisor, only=only, out_dir=ns.out, as_json=ns.json,
                       shm_base=base, tcp_runs=tcp_runs, tcp_bytes=GiB // divisor, security=ns.security,
                       verify=ns.verify, streams=parse_streams(ns.streams))


def parse_streams(v: str | None) -> int | None:
    """``--streams``: None (not set), ``auto`` (or 0) -> 0, or N >= 1."""
    if v is None:
        return None
    if v.strip().lower() == "auto":
        return 0
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"--streams: a number >= 1, or auto (= 0), not {v!r}") from None
    if n < 0:
        raise ValueError("--streams: a number >= 1, or auto (= 0)")
    return n


def run_bench(cfg: BenchConfig, log: Callable[[str], None]) -> dict:
    t0 = time.monotonic()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    names = list(cfg.only) if cfg.only else list(SCENARIOS)
    names = [n for n in SCENARIOS if n in names]          # registry order
    doc: dict[str, Any] = {
        "tool": "livemig bench", "format": 1, "started_at": started,
        "mode": "tiny" if cfg.divisor > 1 else "quick" if cfg.quick else "full", "runs": cfg.runs,
        "scenarios_selected": names, "shm_prefix": cfg.shm_base, "security": cfg.security, "verify": cfg.verify,
        "streams": cfg.streams,
        "machine": machine_facts(),
        "foreign_cpu": foreign_cpu(), "errors": [],
    }
    log(f"raw TCP baseline: {cfg.tcp_bytes / MiB:.0f} MiB x {cfg.tcp_runs} runs")
    meter = CpuMeter()
    try:
        doc["baseline"] = rawtcp.measure(cfg.tcp_bytes, cfg.tcp_runs, prefix=f"{cfg.shm_base}-t", log=log)
    except Exception as exc:  # noqa: BLE001 - the bench goes on; ratios are then absent
        doc["baseline"] = {"error": repr(exc)}
        doc["errors"].append(f"baseline: {exc!r}")
    doc["baseline"]["cpu"] = meter.read()
    baseline = doc["baseline"] if "gibps" in doc["baseline"] else None
    results: dict[str, dict] = {}
    for si, name in enumerate(names):
        scen = SCENARIOS[name]
        runs: list[RunRecord] = []
        meter = CpuMeter()
        for k in range(cfg.runs):
            prefix = f"{cfg.shm_base}-s{si}r{k}"
            log(f"{name}: run {k + 1}/{cfg.runs} (shm prefix {prefix})")
            ts = time.monotonic()
            try:
                rec = scen.run(Ctx(cfg=cfg, baseline=baseline, prefix=prefix, log=log))
            except Exception as exc:  # noqa: BLE001 - agents failing to start, control errors, ...
                rec = RunRecord(error=f"{type(exc).__name__}: {exc}")
                rec.leaks = reap_leftovers(prefix)
            rec.seconds = time.monotonic() - ts
            m = rec.metrics
            log(f"{name}: run {k + 1} " + ("ok" if rec.ok else f"FAILED: {rec.error}") +
                (f", total {m.get('total_ms')} ms, downtime {m.get('downtime_ms')} ms, rounds {m.get('rounds')}, "
                 f"{m.get('throughput_gibps')} GiB/s, verified {m.get('verified')} ({rec.seconds:.1f} s)"
                 if rec.ok else ""))
            runs.append(rec)
        results[name] = aggregate(scen, cfg, runs)
        results[name]["cpu"] = cpu = meter.read()
        if cpu["foreign_cores"] > FOREIGN_WARN_CORES:
            log(f"WARNING {name}: other processes used {cpu['foreign_cores']} cores during the scenario")
        for e in results[name]["errors"]:
            doc["errors"].append(f"{name}: {e}")
        if results[name]["leaks"]:
            doc["errors"].append(f"{name}: leaked (and removed) {results[name]['leaks']}")
    post_process(results)
    doc["scenarios"] = results
    doc["targets"] = evaluate_targets(results)
    doc["duration_s"] = round(time.monotonic() - t0, 1)
    doc["finished_at"] = datetime.datetime.now().isoformat(timespec="seconds")
    doc["ok"] = not doc["errors"] and all(r["completed"] for r in results.values())
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        cfg = config_from_args(ns)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"livemig bench: {exc}", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} bench: {msg}", file=sys.stderr, flush=True)

    doc = run_bench(cfg, log)
    if cfg.write_files:
        try:
            js, md = write_outputs(doc, cfg.out_dir)
            log(f"wrote {js} and {md} (and latest.json/latest.md)")
        except OSError as exc:
            log(f"cannot write results to {cfg.out_dir}: {exc}")
            doc["ok"] = False
    if cfg.as_json:
        print(json.dumps(doc, indent=1, default=str))
    else:
        print(format_table(doc))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
