"""Prometheus metrics: a tiny registry and a text-format (0.0.4) endpoint.

No dependencies beyond the standard library and asyncio. ``AgentMetrics``
owns the livemig metric families; the agent calls
``migration_started(direction)`` when a job starts and
``migration_finished(direction, status, report)`` when it ends (``report`` is
``Job.report()``). Gauges are evaluated at scrape time from a callback
(``gauges=lambda: host_gauges(host)``) so a scrape always shows the truth,
not the last push; ``set_gauges`` exists for callers without a callback.

``MetricsServer(registry, host, port)`` serves ``GET /metrics`` (and HEAD)
with ``asyncio.start_server``: one request per connection, a bounded
request head, a read timeout, a bounded number of clients; 404 for other
paths, 405 for other methods, 400 (and close) for garbage.
"""
from __future__ import annotations

import asyncio
import math
import re
from typing import Callable, Iterable, Mapping, Sequence

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
GaugeSource = Callable[[], Mapping[str, float]]


def host_gauges(host) -> dict[str, int]:
    """Scrape-time gauges from an ``agent.daemon.host.Host`` (duck-typed: ``jobs``, ``registry``).

    ``queue_depth``: outbound jobs waiting for a live-migration slot;
    ``running``: jobs (both directions) past the queue and not finished;
    ``vms``: VMs this agent holds (running, paused or arriving).
    """
    running = host.jobs.running()
    queued = sum(1 for j in running if getattr(j.phase, "value", j.phase) == "queued")
    return {"queue_depth": queued, "running": len(running) - queued, "vms": len(host.registry)}


class AgentMetrics:
    """The livemig metric families and the hooks the agent calls."""

    def __init__(self, gauges: GaugeSource | None = None, registry: Registry | None = None) -> None:
        self.registry = r = registry or Registry()
        dirs = [{"direction": d} for d in DIRECTIONS]
        self.started = r.counter("livemig_migrations_started_total", "Migrations started.", ("direction",), initial=dirs)
        self.completed = r.counter("livemig_migrations_completed_total", "Migrations completed (committed).",
                                   ("direction",), initial=dirs)
        self.failed = r.counter("livemig_migrations_failed_total", "Migrations that failed and rolled back.",
                                ("direction",), initial=dirs)
        self.cancelled = r.counter("livemig_migrations_cancelled_total", "Migrations cancelled.",
                                   ("direction",), initial=dirs)
        self.bytes_sent = r.counter("livemig_bytes_sent_total",
                                    "Guest page payload bytes moved (sent outbound, received inbound), headers excluded.",
                                    ("direction",), initial=dirs)
        self.pages_sent = r.counter("livemig_pages_sent_total", "Guest pages moved, all rounds.",
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
        self._gauges = gauges
        r.on_collect(self._collect)

    # ---- hooks -----------------------------------------------------------
    def migration_started(self, direction: str) -> None:
        self.started.inc(direction=direction)

    def migration_finished(self, direction: str, status: str, report: Mapping) -> None:
        """Count one finished migration from its ``Job.report()``.

        ``status`` is ``completed``, ``failed`` or ``cancelled`` (anything else
        counts as failed). Bytes and pages count for every outcome (they
        crossed the wire); downtime is observed for completed migrations only.
        """
        if status == "completed":
            self.completed.inc(direction=direction)
            downtime_ms = float(report.get("downtime_ms") or 0.0)
            if downtime_ms > 0:
                self.downtime.observe(downtime_ms / 1000.0, direction=direction)
        elif status == "cancelled":
            self.cancelled.inc(direction=direction)
        else:
            self.failed.inc(direction=direction)
        self.bytes_sent.inc(max(0, int(report.get("bytes_sent") or 0)), direction=direction)
        self.pages_sent.inc(max(0, int(report.get("pages_sent") or 0)), direction=direction)
        total_ms = report.get("total_ms")
        if total_ms is not None:
            self.duration.observe(max(0.0, float(total_ms)) / 1000.0, direction=direction)

    def set_gauges(self, queue_depth: int, running: int, vms: int) -> None:
        self.queue_depth.set(queue_depth)
        self.running.set(running)
        self.vms.set(vms)

    def _collect(self) -> None:
        if self._gauges is not None:
            g = self._gauges()
            self.set_gauges(g.get("queue_depth", 0), g.get("running", 0), g.get("vms", 0))

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
