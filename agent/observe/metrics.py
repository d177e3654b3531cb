"""Prometheus metrics: a tiny registry and a text-format (0.0.4) endpoint.

No dependencies beyond the standard library and asyncio. ``AgentMetrics``
owns the livemig metric families; the agent calls
``migration_started(direction)`` when a job starts and
``migration_finished(direction, status, report, reason)`` when it ends
(``report`` is ``Job.report()``, ``reason`` one of ``FAILURE_REASONS``).
Gauges are evaluated at scrape time from a callback
(``gauges=lambda: host_gauges(host)``) so a scrape always shows the truth,
not the last push; ``set_gauges`` exists for callers without a callback.

Families (units in the name, ``_total`` for counters):

- ``livemig_build_info{version,python} 1``;
- counters by ``direction``: ``livemig_migrations_{started,completed,cancelled}_total``,
  ``livemig_migrations_failed_total{direction,reason}``,
  ``livemig_migration_transferred_{bytes,pages}_total`` (sent outbound,
  received inbound; the deprecated ``livemig_{bytes,pages}_sent_total`` say the same);
- histograms ``livemig_downtime_seconds``, ``livemig_migration_duration_seconds``;
- host gauges: ``livemig_queue_depth``, ``livemig_migrations_running``,
  ``livemig_vms``, ``livemig_maintenance``, ``livemig_limit_*``,
  ``livemig_live_migrations_in_use``;
- in-flight gauges per running migration, labels ``vm``, ``job``,
  ``direction`` (cf. KubeVirt's ``kubevirt_vmi_migration_*``): data
  remaining/processed/total bytes, dirty and transfer rates (bytes/s),
  expected downtime (s), guest throttle (ratio), round. They exist while
  the job runs and are gone from the first scrape after it ends.

``MetricsServer(registry, host, port)`` serves ``GET /metrics`` (and HEAD)
with ``asyncio.start_server``: one request per connection, a bounded
request head, a read timeout, a bounded number of clients; 404 for other
paths, 405 for other methods, 400 (and close) for garbage. The agent
starts it on ``[metrics] listen`` (or ``--metrics``, which wins).
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import math
import platform
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
MAX_CLIENTS = 64

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

DIRECTIONS = ("outbound", "inbound")
STATUSES = ("completed", "failed", "cancelled")
DOWNTIME_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS_S = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


# ---- text format helpers -----------------------------------------------------
def format_value(v: float) -> str:
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str], extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{_escape_label(extra[1])}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


# ---- metric families -----------------------------------------------------------
class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"bad metric name {name!r}")
        for ln in labelnames:
            if not _LABEL_RE.fullmatch(ln) or ln.startswith("__") or ln == "le":
                raise ValueError(f"bad label name {ln!r}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)

    def _key(self, labels: Mapping[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def render(self) -> list[str]:
        return self.header() + self.samples()


class Counter(_Metric):
    """Monotonic count. Label sets named at construction start at 0."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 initial: Iterable[Mapping[str, str]] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        if not self.labelnames:
            self._values[()] = 0
        for labels in initial:
            self._values[self._key(labels)] = 0

    def inc(self, amount: float = 1, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up (inc by {amount})")
        k = self._key(labels)
        self._values[k] = self._values.get(k, 0) + amount

    def get(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0)

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.labelnames, k)} {format_value(v)}" for k, v in self._values.items()]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if self.labelnames else {(): 0}

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = value

    def inc(self, amount: float = 1, **labels: str) -> None:
        k = self._key(labels)
        self._values[k] = self._values.get(k, 0) + amount

    def dec(self, amount: float = 1, **labels: str) -> None:
        self.inc(-amount, **labels)

    def replace(self, values: Mapping[tuple[str, ...], float]) -> None:
        """Every labelled series at once: series not in ``values`` disappear (scrape-time families)."""
        for k in values:
            if len(k) != len(self.labelnames):
                raise ValueError(f"{self.name}: label values {k} do not match {self.labelnames}")
        self._values = {tuple(map(str, k)): v for k, v in values.items()}

    def get(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0)

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.labelnames, k)} {format_value(v)}" for k, v in self._values.items()]


class Histogram(_Metric):
    """Fixed upper bounds; exposition is cumulative, ``+Inf`` equals ``_count``."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = (),
                 initial: Iterable[Mapping[str, str]] = ()) -> None:
        super().__init__(name, help, labelnames)
        bounds = [float(b) for b in buckets if not math.isinf(b)]
        if not bounds or bounds != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be increasing and distinct")
        self.bounds = tuple(bounds)
        # per label set: [count per bucket (non-cumulative, last = +Inf)], sum, count
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        if not self.labelnames:
            self._new(())
        for labels in initial:
            self._new(self._key(labels))

    def _new(self, k: tuple[str, ...]):
        s = ([0] * (len(self.bounds) + 1), [0.0, 0])
        self._series[k] = s
        return s

    def observe(self, value: float, **labels: str) -> None:
        k = self._key(labels)
        counts, agg = self._series.get(k) or self._new(k)
        i = 0
        while i < len(self.bounds) and value > self.bounds[i]:
            i += 1
        counts[i] += 1
        agg[0] += value
        agg[1] += 1

    def count(self, **labels: str) -> int:
        s = self._series.get(self._key(labels))
        return int(s[1][1]) if s else 0

    def samples(self) -> list[str]:
        out = []
        for k, (counts, (total, n)) in self._series.items():
            acc = 0
            for bound, c in zip(self.bounds + (math.inf,), counts):
                acc += c
                out.append(f"{self.name}_bucket{_labels(self.labelnames, k, ('le', format_value(float(bound))))} {acc}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, k)} {format_value(float(total))}")
            out.append(f"{self.name}_count{_labels(self.labelnames, k)} {int(n)}")
        return out


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._hooks: list[Callable[[], None]] = []

    def register(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} already registered")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = (), **kw) -> Counter:
        return self.register(Counter(name, help, labelnames, **kw))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self.register(Gauge(name, help, labelnames))  # type: ignore[return-value]

    def histogram(self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = (), **kw) -> Histogram:
        return self.register(Histogram(name, help, buckets, labelnames, **kw))  # type: ignore[return-value]

    def on_collect(self, hook: Callable[[], None]) -> None:
        """``hook()`` runs before every render (scrape-time gauges)."""
        self._hooks.append(hook)

    def get(self, name: str) -> _Metric:
        return self._metrics[name]

    def render(self) -> str:
        for hook in self._hooks:
            try:
                hook()
            except Exception:       # a broken callback must not break the scrape: keep the last values
                pass
        lines: list[str] = []
        for m in self._metrics.values():
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


# ---- livemig metrics -----------------------------------------------------------
GaugeSource = Callable[[], Mapping[str, Any]]
PAGE_BYTES = 4096

# Why a migration failed: a small closed set (a label must not carry free
# text). First match wins; ``failure_reason`` documents each class.
FAILURE_REASONS = ("verify", "deadline", "timeout", "peer", "refused", "guest", "cancelled", "other")
_REASON_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("deadline", ("switchover deadline", "deadline")),
    ("peer", ("cannot connect", "connection to", "handshake")),     # before verify: CERTIFICATE_VERIFY_FAILED
    ("verify", ("chunk(s) differ", "digests", "verif")),
    ("cancelled", ("cancel",)),
    ("guest", ("guest",)),
    ("timeout", ("no message from", "stopped reading", "timed out", "timeout")),
    ("refused", ("refused:", "admission", "no memory", "maintenance", "busy")),
    ("peer", ("peer", "lost", "closed", "reset", "tls", "protocol", "unexpected", "malformed")),
)


def failure_reason(error: str | None, verify_failed: bool = False) -> str:
    """The class of a failed job's error, one of FAILURE_REASONS.

    ``verify``: the destination's memory did not match (digests differ);
    ``deadline``: the switchover deadline passed while the guest was paused;
    ``cancelled``: cancelled (e.g. the agent shut down) and counted as a failure;
    ``guest``: the guest process died during the migration;
    ``peer``: the peer could not be reached, lost the connection, aborted or broke the protocol;
    ``timeout``: the peer went silent or stopped reading past the I/O timeout;
    ``refused``: the destination's admission said no (memory, busy, maintenance);
    ``other``: anything else (internal errors included).
    """
    if verify_failed:
        return "verify"
    text = (error or "").lower()
    for reason, needles in _REASON_PATTERNS:
        if any(n in text for n in needles):
            return reason
    return "other"


def build_version() -> str:
    """The installed distribution's version (importlib.metadata), or "unknown" from a bare checkout."""
    try:
        return importlib.metadata.version("livemig")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def job_gauges(job) -> dict[str, Any]:
    """The in-flight figures of one running job (``agent.migration.jobs.Job``, duck-typed)."""
    s = job.stats
    phase = getattr(job.phase, "value", job.phase)
    remaining = s.remaining_bytes
    if s.rounds == 0 and phase == "precopy":
        # Round 1 under way: the drivers set remaining_bytes at a round's end;
        # until then it is what round 1 has not covered yet (as the destination counts it).
        remaining = max(remaining, (s.pages_total - s.pages_sent - s.zero_pages) * PAGE_BYTES, 0)
    return {
        "vm": str(job.vm), "job": str(job.id), "direction": str(job.direction),
        "remaining_bytes": remaining,
        "processed_bytes": s.bytes_sent,
        "total_bytes": s.ram_bytes,
        "dirty_rate_bytes_per_second": s.dirty_rate_pps * PAGE_BYTES,
        "transfer_rate_bytes_per_second": s.bandwidth_bps,
        "expected_downtime_seconds": s.expected_downtime_ms / 1000.0,
        "throttle_ratio": s.throttle_pct / 100.0,
        "round": s.rounds + 1 if phase in ("precopy", "stop-and-copy") else s.rounds,
    }


def host_gauges(host) -> dict[str, Any]:
    """Scrape-time gauges from an ``agent.daemon.host.Host`` (duck-typed).

    ``queue_depth``: outbound jobs waiting for a live-migration slot;
    ``running``: live-migration jobs (both directions) past the queue and not finished;
    ``vms``: VMs this agent holds (running, paused or arriving);
    ``migrations``: ``job_gauges`` of every running job past the queue;
    ``maintenance``: 1 while the host refuses inbound migrations;
    ``limits``: the limits in force now (``config set`` changes some at run time).
    """
    # live migrations only: storage moves (kind "storage") are not migrations and have their own figures
    running = [j for j in host.jobs.running() if getattr(j, "kind", "live") == "live"]
    queued = [j for j in running if getattr(j.phase, "value", j.phase) == "queued"]
    moving = [j for j in running if getattr(j.phase, "value", j.phase) != "queued"]
    out: dict[str, Any] = {"queue_depth": len(queued), "running": len(moving), "vms": len(host.registry),
                           "migrations": [job_gauges(j) for j in moving]}
    if hasattr(host, "maintenance"):
        out["maintenance"] = int(bool(host.maintenance))
    slots = getattr(host, "slots", None)
    cfg = getattr(host, "cfg", None)
    if slots is not None and cfg is not None:
        lim = cfg.limits
        bw = getattr(host, "bandwidth", None)
        out["limits"] = {
            "live_migrations": slots.limit,
            "live_migrations_in_use": slots.in_use,
            "storage_migrations": getattr(host, "storage_limit", lim.max_storage_migrations),
            "connections": lim.max_connections,
            "guest_memory_bytes": lim.max_guest_memory_mib * 2**20,
            "host_bandwidth_bytes_per_second": bw.rate_bps if bw is not None else 0,
        }
    return out


# in-flight gauge -> (job_gauges key, help); labels vm, job, direction
MIGRATION_GAUGES = (
    ("livemig_migration_data_remaining_bytes", "remaining_bytes",
     "Running migration: bytes still to send (the pending dirty memory, and the unsent part of round 1)."),
    ("livemig_migration_data_processed_bytes", "processed_bytes",
     "Running migration: guest page payload bytes moved so far, all rounds (sent outbound, received inbound)."),
    ("livemig_migration_data_total_bytes", "total_bytes", "Running migration: the guest's RAM size."),
    ("livemig_migration_dirty_memory_rate_bytes_per_second", "dirty_rate_bytes_per_second",
     "Running migration: rate at which the guest dirties memory (source side; 0 inbound)."),
    ("livemig_migration_memory_transfer_rate_bytes_per_second", "transfer_rate_bytes_per_second",
     "Running migration: page payload transfer rate (source side; 0 inbound)."),
    ("livemig_migration_expected_downtime_seconds", "expected_downtime_seconds",
     "Running migration: the pause the remaining bytes would take at the current rate (source side)."),
    ("livemig_migration_guest_throttle_ratio", "throttle_ratio",
     "Running migration: guest CPU throttle set by auto-converge, 0..1 (source side)."),
    ("livemig_migration_round", "round", "Running migration: the pre-copy round under way (or completed)."),
)
MIGRATION_LABELS = ("vm", "job", "direction")
# limit gauge -> (host_gauges["limits"] key, help)
LIMIT_GAUGES = (
    ("livemig_limit_live_migrations", "live_migrations",
     "Live migrations (both directions) this host runs at once (limits.max_live_migrations, config set)."),
    ("livemig_live_migrations_in_use", "live_migrations_in_use", "Live-migration slots in use now."),
    ("livemig_limit_storage_migrations", "storage_migrations", "Storage migrations this host runs at once."),
    ("livemig_limit_connections", "connections", "Concurrent migration-endpoint connections (limits.max_connections)."),
    ("livemig_limit_guest_memory_bytes", "guest_memory_bytes",
     "Guest RAM this host may hold in all (limits.max_guest_memory_mib); 0 = what is free."),
    ("livemig_limit_host_bandwidth_bytes_per_second", "host_bandwidth_bytes_per_second",
     "Cap on all outbound migrations of this host together (limits.host_max_bandwidth_mibps); 0 = unlimited."),
)


class AgentMetrics:
    """The livemig metric families and the hooks the agent calls.

    Renamed (the old names stay, deprecated, until their last readers move):
    ``livemig_bytes_sent_total`` -> ``livemig_migration_transferred_bytes_total``,
    ``livemig_pages_sent_total`` -> ``livemig_migration_transferred_pages_total``
    (inbound migrations *receive* those bytes; "sent" was wrong for them).
    """

    def __init__(self, gauges: GaugeSource | None = None, registry: Registry | None = None,
                 version: str | None = None) -> None:
        self.registry = r = registry or Registry()
        dirs = [{"direction": d} for d in DIRECTIONS]
        self.build_info = r.gauge("livemig_build_info", "The running livemig: its version (value always 1).",
                                  ("version", "python"))
        self.build_info.set(1, version=version or build_version(), python=platform.python_version())
        self.started = r.counter("livemig_migrations_started_total", "Migrations started.", ("direction",), initial=dirs)
        self.completed = r.counter("livemig_migrations_completed_total", "Migrations completed (committed).",
                                   ("direction",), initial=dirs)
        self.failed = r.counter("livemig_migrations_failed_total",
                                "Migrations that failed and rolled back, by reason (" + ", ".join(FAILURE_REASONS)
                                + ").", ("direction", "reason"),
                                initial=[{"direction": d, "reason": x} for d in DIRECTIONS for x in FAILURE_REASONS])
        self.cancelled = r.counter("livemig_migrations_cancelled_total", "Migrations cancelled.",
                                   ("direction",), initial=dirs)
        self.bytes_transferred = r.counter(
            "livemig_migration_transferred_bytes_total",
            "Guest page payload bytes moved by finished migrations (sent by outbound, received by inbound ones), "
            "headers excluded.", ("direction",), initial=dirs)
        self.pages_transferred = r.counter(
            "livemig_migration_transferred_pages_total",
            "Guest pages moved by finished migrations, all rounds (sent outbound, received inbound).",
            ("direction",), initial=dirs)
        self.bytes_sent = r.counter("livemig_bytes_sent_total",
                                    "Deprecated: same as livemig_migration_transferred_bytes_total.",
                                    ("direction",), initial=dirs)
        self.pages_sent = r.counter("livemig_pages_sent_total",
                                    "Deprecated: same as livemig_migration_transferred_pages_total.",
                                    ("direction",), initial=dirs)
        self.downtime = r.histogram("livemig_downtime_seconds",
                                    "Guest pause of completed migrations: pause request to Resumed.",
                                    DOWNTIME_BUCKETS_S, ("direction",), initial=dirs)
        self.duration = r.histogram("livemig_migration_duration_seconds",
                                    "Wall time of finished migrations, start to end, any outcome.",
                                    DURATION_BUCKETS_S, ("direction",), initial=dirs)
        self.queue_depth = r.gauge("livemig_queue_depth", "Outbound migrations waiting for a live-migration slot.")
        self.running = r.gauge("livemig_migrations_running", "Migrations in progress (both directions).")
        self.vms = r.gauge("livemig_vms", "VMs held by this agent.")
        self.maintenance = r.gauge("livemig_maintenance", "1 while the host is in maintenance (refuses inbound).")
        self.limits = {key: r.gauge(name, help) for name, key, help in LIMIT_GAUGES}
        self.migration = {key: r.gauge(name, help, MIGRATION_LABELS) for name, key, help in MIGRATION_GAUGES}
        self._gauges = gauges
        r.on_collect(self._collect)

    # ---- hooks -----------------------------------------------------------
    def migration_started(self, direction: str) -> None:
        self.started.inc(direction=direction)

    def migration_finished(self, direction: str, status: str, report: Mapping, reason: str | None = None) -> None:
        """Count one finished migration from its ``Job.report()``.

        ``status`` is ``completed``, ``failed`` or ``cancelled`` (anything else
        counts as failed). A failure is counted under ``reason`` (one of
        FAILURE_REASONS), or the class of ``report["error"]`` when not given.
        Bytes and pages count for every outcome (they crossed the wire);
        downtime is observed for completed migrations only.
        """
        if status == "completed":
            self.completed.inc(direction=direction)
            downtime_ms = float(report.get("downtime_ms") or 0.0)
            if downtime_ms > 0:
                self.downtime.observe(downtime_ms / 1000.0, direction=direction)
        elif status == "cancelled":
            self.cancelled.inc(direction=direction)
        else:
            reason = reason if reason in FAILURE_REASONS else failure_reason(report.get("error"))
            self.failed.inc(direction=direction, reason=reason)
        nbytes = max(0, int(report.get("bytes_sent") or 0))
        npages = max(0, int(report.get("pages_sent") or 0))
        for c, n in ((self.bytes_transferred, nbytes), (self.bytes_sent, nbytes),
                     (self.pages_transferred, npages), (self.pages_sent, npages)):
            c.inc(n, direction=direction)
        total_ms = report.get("total_ms")
        if total_ms is not None:
            self.duration.observe(max(0.0, float(total_ms)) / 1000.0, direction=direction)

    def set_gauges(self, queue_depth: int, running: int, vms: int, *, maintenance: int | None = None,
                   limits: Mapping[str, float] | None = None,
                   migrations: Iterable[Mapping[str, Any]] | None = None) -> None:
        """Host gauges; ``migrations`` (``job_gauges`` dicts) replaces every in-flight series,
        so a job that ended is gone from the next scrape."""
        self.queue_depth.set(queue_depth)
        self.running.set(running)
        self.vms.set(vms)
        if maintenance is not None:
            self.maintenance.set(int(maintenance))
        for key, value in (limits or {}).items():
            if key in self.limits:
                self.limits[key].set(value)
        if migrations is not None:
            migrations = list(migrations)
            for key, gauge in self.migration.items():
                gauge.replace({tuple(str(m[ln]) for ln in MIGRATION_LABELS): m[key] for m in migrations})

    def _collect(self) -> None:
        if self._gauges is not None:
            g = self._gauges()
            self.set_gauges(g.get("queue_depth", 0), g.get("running", 0), g.get("vms", 0),
                            maintenance=g.get("maintenance"), limits=g.get("limits"),
                            migrations=g.get("migrations", ()))

    def render(self) -> str:
        return self.registry.render()


# ---- HTTP endpoint -------------------------------------------------------------
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class MetricsServer:
    """``GET /metrics`` over HTTP/1.x, one request per connection."""

    def __init__(self, registry: Registry | AgentMetrics, host: str = "127.0.0.1", port: int = 9101, *,
                 path: str = "/metrics", max_clients: int = MAX_CLIENTS,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.registry = registry.registry if isinstance(registry, AgentMetrics) else registry
        self.host = host
        self.port = port
        self.path = path
        self.max_clients = max_clients
        self.request_timeout_s = request_timeout_s
        self.server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task] = set()
        self.address: tuple[str, int] | None = None

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._client, self.host, self.port,
                                                 limit=MAX_REQUEST_HEAD_BYTES, reuse_address=True)
        sockname = self.server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        return self.address

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self._clients):
            t.cancel()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=2.0)
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._clients) >= self.max_clients:
            writer.transport.abort()
            return
        self._clients.add(task)
        try:
            try:
                async with asyncio.timeout(self.request_timeout_s):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.LimitOverrunError, ValueError):
                await self._respond(writer, 431, "request head too large\n")
                return
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    await self._respond(writer, 400, "incomplete request\n")
                return
            except TimeoutError:
                await self._respond(writer, 408, "request timeout\n")
                return
            status, body, head_only, extra = self._route(head)
            await self._respond(writer, status, body, head_only=head_only, extra=extra)
        except (ConnectionError, OSError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    def _route(self, head: bytes) -> tuple[int, str, bool, dict[str, str]]:
        try:
            request_line = head.split(b"\r\n", 1)[0].decode("ascii")
            method, target, version = request_line.split(" ")
        except (UnicodeDecodeError, ValueError):
            return 400, "bad request line\n", False, {}
        if not version.startswith("HTTP/1.") or not method.isalpha() or not method.isupper() or not target:
            return 400, "bad request line\n", False, {}
        if target.split("?", 1)[0] != self.path:
            return 404, "not found: try /metrics\n", method == "HEAD", {}
        if method not in ("GET", "HEAD"):
            return 405, "method not allowed\n", False, {"Allow": "GET, HEAD"}
        return 200, self.registry.render(), method == "HEAD", {"Content-Type": CONTENT_TYPE}

    async def _respond(self, writer: asyncio.StreamWriter, status: int, body: str, *, head_only: bool = False,
                       extra: Mapping[str, str] | None = None) -> None:
        data = body.encode("utf-8")
        headers = {"Content-Type": "text/plain; charset=utf-8", **(extra or {}),
                   "Content-Length": str(len(data)), "Connection": "close"}
        out = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        out += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(out.encode("ascii") + (b"" if head_only else data))
        try:
            async with asyncio.timeout(self.request_timeout_s):
                await writer.drain()
        except TimeoutError:
            writer.transport.abort()
