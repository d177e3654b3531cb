"""agent.metrics: the text format (0.0.4) and a real MetricsServer on 127.0.0.1, port 0."""
from __future__ import annotations

import asyncio
import math
import re

import pytest
import pytest_asyncio

from agent.observe.metrics import (FAILURE_REASONS, MIGRATION_GAUGES, AgentMetrics, Counter, Gauge, Histogram,
                                   MetricsServer, Registry, build_version, failure_reason, format_value, host_gauges,
                                   job_gauges)

pytestmark = pytest.mark.timeout(30)

SAMPLE_RE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*)?)\})?'
    r' (?P<value>\S+)$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_exposition(text: str) -> dict[str, dict]:
    """Strict-enough parser: returns {family: {"type", "help", "samples": [(name, labels, value)]}}."""
    assert text.endswith("\n"), "exposition must end with a newline"
    fams: dict[str, dict] = {}
    for line in text.splitlines():
        assert line, "no blank lines"
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            fams.setdefault(name, {"samples": []})["help"] = help_
            continue
        if line.startswith("# TYPE "):
            name, _, typ = line[7:].partition(" ")
            assert typ in TYPES, line
            f = fams.setdefault(name, {"samples": []})
            assert "type" not in f and not f["samples"], f"TYPE for {name} after its samples or twice"
            f["type"] = typ
            continue
        assert not line.startswith("#"), line
        m = SAMPLE_RE.match(line)
        assert m, f"bad sample line {line!r}"
        name, value = m["name"], m["value"]
        labels = dict(LABEL_RE.findall(m["labels"] or ""))
        v = float(value.replace("Inf", "inf"))          # +Inf, -Inf, NaN parse
        fam = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in fams and fams[name[: -len(suffix)]].get("type") == "histogram":
                fam = name[: -len(suffix)]
        assert fam in fams and "type" in fams[fam], f"sample {name} without a TYPE line"
        fams[fam]["samples"].append((name, labels, v))
    for name, f in fams.items():
        assert "help" in f and "type" in f, name
        if f["type"] == "histogram":
            check_histogram(name, f["samples"])
    return fams


def check_histogram(name: str, samples: list) -> None:
    series: dict[tuple, dict] = {}
    for sname, labels, v in samples:
        key = tuple(sorted((k, x) for k, x in labels.items() if k != "le"))
        s = series.setdefault(key, {"buckets": [], "sum": None, "count": None})
        if sname == name + "_bucket":
            s["buckets"].append((float(labels["le"].replace("Inf", "inf")), v))
        elif sname == name + "_sum":
            s["sum"] = v
        elif sname == name + "_count":
            s["count"] = v
    for key, s in series.items():
        les = [le for le, _ in s["buckets"]]
        counts = [c for _, c in s["buckets"]]
        assert les == sorted(les) and len(set(les)) == len(les), (name, key, les)
        assert les[-1] == math.inf, f"{name}{key}: no +Inf bucket"
        assert counts == sorted(counts), f"{name}{key}: buckets not cumulative {counts}"
        assert s["count"] is not None and s["sum"] is not None, (name, key)
        assert counts[-1] == s["count"], f"{name}{key}: +Inf {counts[-1]} != count {s['count']}"


def value(fams, family, sample=None, **labels) -> float:
    sample = sample or family
    for n, lb, v in fams[family]["samples"]:
        if n == sample and all(lb.get(k) == str(x) for k, x in labels.items()):
            return v
    raise KeyError((sample, labels))


REPORT = {"status": "completed", "bytes_sent": 134217728, "pages_sent": 32768, "downtime_ms": 37.2, "total_ms": 1250.4}


# ---- registry and format ----------------------------------------------------------
def test_format_value():
    assert format_value(3) == "3" and format_value(2.0) == "2" and format_value(0.25) == "0.25"
    assert format_value(math.inf) == "+Inf" and format_value(-math.inf) == "-Inf" and format_value(math.nan) == "NaN"


def test_counter_gauge_histogram_and_escaping():
    r = Registry()
    c = r.counter("x_total", 'help with \\ and\nnewline', ("k",))
    c.inc(2, k='a"b\\c\nd')
    with pytest.raises(ValueError):
        c.inc(-1, k="a")
    with pytest.raises(ValueError):
        c.inc(1, other="a")
    g = r.gauge("g", "a gauge")
    g.set(5)
    g.dec(2)
    h = r.histogram("h_seconds", "h", (0.1, 1.0))
    for x in (0.05, 0.1, 0.5, 3.0):
        h.observe(x)
    text = r.render()
    assert '# HELP x_total help with \\\\ and\\nnewline' in text
    assert 'x_total{k="a\\"b\\\\c\\nd"} 2' in text
    fams = parse_exposition(text)
    assert value(fams, "g") == 3
    assert [v for n, _, v in fams["h_seconds"]["samples"] if n == "h_seconds_bucket"] == [2, 3, 4]   # le is inclusive
    assert value(fams, "h_seconds", "h_seconds_sum") == pytest.approx(3.65)
    with pytest.raises(ValueError):
        r.gauge("g", "again")
    with pytest.raises(ValueError):
        Counter("bad name", "x")
    with pytest.raises(ValueError):
        Histogram("h2", "x", (1.0, 0.5))
    with pytest.raises(ValueError):
        Gauge("g2", "x", ("le",))


def test_agent_metrics_families_and_hooks():
    gauges = {"queue_depth": 1, "running": 2, "vms": 3}
    m = AgentMetrics(gauges=lambda: gauges)
    fams = parse_exposition(m.render())
    for fam in ("livemig_migrations_started_total", "livemig_migrations_completed_total",
                "livemig_migrations_cancelled_total", "livemig_migration_transferred_bytes_total",
                "livemig_migration_transferred_pages_total", "livemig_bytes_sent_total", "livemig_pages_sent_total"):
        assert fams[fam]["type"] == "counter"
        assert value(fams, fam, direction="outbound") == 0 and value(fams, fam, direction="inbound") == 0
    failed = fams["livemig_migrations_failed_total"]
    assert failed["type"] == "counter"
    assert {(lb["direction"], lb["reason"]) for _, lb, _ in failed["samples"]} == {
        (d, r) for d in ("outbound", "inbound") for r in FAILURE_REASONS}       # every series starts at 0
    assert all(v == 0 for _, _, v in failed["samples"])
    assert [lb for _, lb, v in fams["livemig_build_info"]["samples"] if v == 1][0]["version"] == build_version()
    for fam in ("livemig_downtime_seconds", "livemig_migration_duration_seconds"):
        assert fams[fam]["type"] == "histogram"
    for fam in ("livemig_queue_depth", "livemig_migrations_running", "livemig_vms"):
        assert fams[fam]["type"] == "gauge"
    assert (value(fams, "livemig_queue_depth"), value(fams, "livemig_migrations_running"),
            value(fams, "livemig_vms")) == (1, 2, 3)

    m.migration_started("outbound")
    m.migration_started("outbound")
    m.migration_started("inbound")
    m.migration_finished("outbound", "completed", REPORT)
    m.migration_finished("outbound", "failed", {"status": "failed", "bytes_sent": 4096, "pages_sent": 1,
                                                "downtime_ms": 0.0, "total_ms": 80.0}, reason="verify")
    m.migration_finished("inbound", "failed", {"status": "failed", "error": "precopy: connection to 10.0.0.1:7700 "
                                               "lost (EOF)", "bytes_sent": 8192, "pages_sent": 2})
    m.migration_finished("inbound", "cancelled", {"bytes_sent": 0, "pages_sent": 0, "total_ms": 5.0})
    gauges.update(queue_depth=0, running=0, vms=7)          # scrape-time truth
    fams = parse_exposition(m.render())
    assert value(fams, "livemig_migrations_started_total", direction="outbound") == 2
    assert value(fams, "livemig_migrations_started_total", direction="inbound") == 1
    assert value(fams, "livemig_migrations_completed_total", direction="outbound") == 1
    assert value(fams, "livemig_migrations_failed_total", direction="outbound", reason="verify") == 1
    assert value(fams, "livemig_migrations_failed_total", direction="inbound", reason="peer") == 1   # from its error
    assert sum(v for _, _, v in fams["livemig_migrations_failed_total"]["samples"]) == 2
    assert value(fams, "livemig_migrations_cancelled_total", direction="inbound") == 1
    for fam in ("livemig_migration_transferred_bytes_total", "livemig_bytes_sent_total"):
        assert value(fams, fam, direction="outbound") == 134217728 + 4096
        assert value(fams, fam, direction="inbound") == 8192                 # received, counted as transferred
    for fam in ("livemig_migration_transferred_pages_total", "livemig_pages_sent_total"):
        assert value(fams, fam, direction="outbound") == 32769
    # downtime: completed migrations only; duration: every finished one
    assert value(fams, "livemig_downtime_seconds", "livemig_downtime_seconds_count", direction="outbound") == 1
    assert value(fams, "livemig_downtime_seconds", "livemig_downtime_seconds_sum", direction="outbound") == pytest.approx(0.0372)
    assert value(fams, "livemig_downtime_seconds", "livemig_downtime_seconds_bucket", direction="outbound", le="0.05") == 1
    assert value(fams, "livemig_downtime_seconds", "livemig_downtime_seconds_bucket", direction="outbound", le="0.025") == 0
    assert value(fams, "livemig_migration_duration_seconds", "livemig_migration_duration_seconds_count",
                 direction="outbound") == 2
    assert value(fams, "livemig_migration_duration_seconds", "livemig_migration_duration_seconds_count",
                 direction="inbound") == 1          # the inbound failure had no total_ms: not observed
    assert value(fams, "livemig_vms") == 7 and value(fams, "livemig_queue_depth") == 0


def test_broken_gauge_callback_keeps_last_values():
    calls = {"n": 0}

    def gauges():
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("boom")
        return {"queue_depth": 4, "running": 1, "vms": 2}

    m = AgentMetrics(gauges=gauges)
    m.render()
    fams = parse_exposition(m.render())
    assert value(fams, "livemig_queue_depth") == 4 and value(fams, "livemig_vms") == 2


def test_set_gauges_without_callback():
    m = AgentMetrics()
    m.set_gauges(queue_depth=3, running=1, vms=5)
    fams = parse_exposition(m.render())
    assert (value(fams, "livemig_queue_depth"), value(fams, "livemig_migrations_running"),
            value(fams, "livemig_vms")) == (3, 1, 5)


def _job(phase: str, job_id: str, direction: str = "outbound"):
    """A real Job in ``phase`` with its stats filled in as the drivers fill them."""
    from agent.migration.jobs import Job
    from agent.migration.phases import MigrationPhase, PhaseTracker

    job = Job(vm=f"vm-{job_id}", source="198.18.0.1:7700", destination="198.18.0.2:7700", direction=direction,
              job_id=job_id)
    job.tracker = PhaseTracker(MigrationPhase(phase))          # as if the driver had walked there
    st = job.stats
    st.ram_bytes, st.bytes_sent, st.remaining_bytes = 64 * 2**20, 40 * 2**20, 3 * 2**20
    st.dirty_rate_pps, st.bandwidth_bps, st.expected_downtime_ms, st.throttle_pct, st.rounds = 250, 12e6, 262.1, 30, 2
    return job


def test_job_gauges_from_a_real_job():
    g = job_gauges(_job("precopy", "j1"))
    assert (g["vm"], g["job"], g["direction"]) == ("vm-j1", "j1", "outbound")
    assert g["remaining_bytes"] == 3 * 2**20 and g["processed_bytes"] == 40 * 2**20 and g["total_bytes"] == 64 * 2**20
    assert g["dirty_rate_bytes_per_second"] == 250 * 4096 and g["transfer_rate_bytes_per_second"] == 12e6
    assert g["expected_downtime_seconds"] == pytest.approx(0.2621) and g["throttle_ratio"] == pytest.approx(0.3)
    assert g["round"] == 3                                                  # the round under way
    assert {key for _, key, _ in MIGRATION_GAUGES} <= set(g)
    first = _job("precopy", "j2")                     # round 1 under way: the drivers set remaining at its end
    first.stats.rounds, first.stats.remaining_bytes = 0, 0
    first.stats.pages_total, first.stats.pages_sent, first.stats.zero_pages = 16384, 10000, 1000
    assert job_gauges(first)["remaining_bytes"] == 5384 * 4096 and job_gauges(first)["round"] == 1


def test_host_gauges_from_a_host_shape():
    from agent.migration.jobs import StorageJob

    class Jobs:
        def __init__(self, jobs):
            self.jobs = jobs

        def running(self):
            return self.jobs

    class Host:
        jobs = Jobs([_job("queued", "q1"), _job("queued", "q2"), _job("precopy", "p1"),
                     _job("negotiate", "n1", "inbound"), StorageJob(vm="vm1", source="h", destination="/x")])
        registry = ["vm1", "vm2", "vm3"]

    g = host_gauges(Host())
    assert (g["queue_depth"], g["running"], g["vms"]) == (2, 2, 3)
    assert [m["job"] for m in g["migrations"]] == ["p1", "n1"]            # queued jobs have no figures yet,
                                                                           # a storage move is no migration
    assert "maintenance" not in g and "limits" not in g                    # this host shape has neither


def test_in_flight_gauges_appear_and_disappear():
    live = {"queue_depth": 0, "running": 1, "vms": 1, "migrations": [job_gauges(_job("precopy", "j1"))]}
    m = AgentMetrics(gauges=lambda: live)
    fams = parse_exposition(m.render())
    for name, key, _ in MIGRATION_GAUGES:
        assert fams[name]["type"] == "gauge"
        assert [lb for _, lb, _ in fams[name]["samples"]] == [{"vm": "vm-j1", "job": "j1", "direction": "outbound"}]
    assert value(fams, "livemig_migration_data_remaining_bytes", job="j1") == 3 * 2**20
    assert value(fams, "livemig_migration_guest_throttle_ratio", job="j1") == pytest.approx(0.3)
    live.update(running=0, migrations=[])                                  # the job ended
    fams = parse_exposition(m.render())
    for name, _, _ in MIGRATION_GAUGES:
        assert name in fams and fams[name]["samples"] == [], name          # family announced, no series


# Error texts as the drivers and the transport write them (agent/migration/*.py, agent/net/*.py).
REASONS = [
    ("verify: ram: 3 chunk(s) differ on the destination (first at page 1024); resumed on the source", "verify"),
    ("10.0.0.1:7700 refused: ram: 3 chunk(s) differ on the destination (first at page 0)", "verify"),
    ("verify: ram: the destination's digests do not cover the same data", "verify"),
    ("stop-and-copy: switchover deadline of 1200 ms passed before the destination was verified; resumed on the "
     "source", "deadline"),
    ("cancelled", "cancelled"),
    ("cancelled (agent shutting down)", "cancelled"),
    ("precopy: guest of vm1 died during the migration: guest process 4242 exited with -9", "guest"),
    ("standby guest of vm1 died: gone", "guest"),
    ("precopy: no message from 10.0.0.1:7700 for 30 s", "timeout"),
    ("precopy: peer 10.0.0.1:7700 stopped reading for 30 s", "timeout"),
    ("precopy: connection to 10.0.0.1:7700 lost (EOF)", "peer"),
    ("cannot connect to 10.0.0.1:7700: [Errno 111] Connection refused", "peer"),
    ("TLS handshake with 10.0.0.1:7700 failed: CERTIFICATE_VERIFY_FAILED", "peer"),
    ("unexpected RoundEnd", "peer"),
    ("10.0.0.1:7700 refused: not enough memory for vm1 (NO_MEMORY)", "refused"),
    ("10.0.0.1:7700 refused: host in maintenance", "refused"),
    ("internal error: KeyError('x')", "other"),
    (None, "other"),
    ("", "other"),
]


@pytest.mark.parametrize("error,reason", REASONS)
def test_failure_reason(error, reason):
    assert failure_reason(error) == reason
    assert reason in FAILURE_REASONS


def test_failure_reason_prefers_the_verify_flag():
    assert failure_reason("precopy: connection to x lost (EOF)", verify_failed=True) == "verify"
    m = AgentMetrics()
    m.migration_finished("outbound", "failed", {"error": "anything"}, reason="not-a-reason")   # not in the set
    fams = parse_exposition(m.render())
    assert value(fams, "livemig_migrations_failed_total", direction="outbound", reason="other") == 1


def test_set_gauges_limits_and_maintenance():
    m = AgentMetrics()
    m.set_gauges(0, 0, 0, maintenance=1, limits={"live_migrations": 4, "host_bandwidth_bytes_per_second": 2**27})
    fams = parse_exposition(m.render())
    assert value(fams, "livemig_maintenance") == 1
    assert value(fams, "livemig_limit_live_migrations") == 4
    assert value(fams, "livemig_limit_host_bandwidth_bytes_per_second") == 2**27


def test_gauge_replace():
    g = Gauge("x_bytes", "x", ("a",))
    g.set(1, a="old")
    g.replace({("new",): 2})
    assert g.samples() == ['x_bytes{a="new"} 2']
    with pytest.raises(ValueError):
        g.replace({("a", "b"): 1})


def test_names_follow_prometheus_conventions():
    fams = parse_exposition(AgentMetrics().render())
    deprecated = {n for n, f in fams.items() if f["help"].startswith("Deprecated")}
    assert deprecated == {"livemig_bytes_sent_total", "livemig_pages_sent_total"}   # kept for old readers only
    for name, f in fams.items():
        assert name.startswith("livemig_"), name
        if name in deprecated:
            continue
        assert "_sent" not in name, name            # inbound migrations receive: "transferred"
        if f["type"] == "counter":
            assert name.endswith("_total"), name
            name = name[: -len("_total")]
        else:
            assert not name.endswith("_total"), name
        for unit in ("bytes", "seconds"):            # <name>_<unit>[_total], or a rate <name>_<unit>_per_second
            if f"_{unit}_" in name and not name.endswith(f"_{unit}_per_second"):
                raise AssertionError(f"{name}: the unit goes last")


# ---- the HTTP endpoint -------------------------------------------------------------------
async def http(addr, raw: bytes, read_timeout_s: float = 5.0) -> tuple[int, dict, bytes]:
    """Send raw bytes, read to EOF (the server closes), parse the response."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(read_timeout_s):
            data = await reader.read()
    finally:
        writer.close()
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no response head in {data[:200]!r}"
    lines = head.decode("ascii").split("\r\n")
    proto, code, _ = lines[0].split(" ", 2)
    assert proto == "HTTP/1.1"
    headers = {k.lower(): v for k, _, v in (ln.partition(": ") for ln in lines[1:])}
    if headers.get("content-length") is not None and body:
        assert int(headers["content-length"]) == len(body)
    return int(code), headers, body


def get(path: str = "/metrics", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n".encode()


@pytest_asyncio.fixture
async def server():
    gauges = {"queue_depth": 0, "running": 0, "vms": 1}
    m = AgentMetrics(gauges=lambda: gauges)
    srv = MetricsServer(m, "127.0.0.1", 0, request_timeout_s=0.5)
    addr = await srv.start()
    try:
        yield srv, addr, m, gauges
    finally:
        await srv.close()


@pytest.mark.asyncio
async def test_scrape_over_a_socket(server):
    srv, addr, m, gauges = server
    assert addr[0] == "127.0.0.1" and addr[1] > 0
    code, headers, body = await http(addr, get())
    assert code == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["content-length"]) == len(body)
    fams = parse_exposition(body.decode())
    assert value(fams, "livemig_vms") == 1
    m.migration_started("outbound")
    m.migration_finished("outbound", "completed", REPORT)
    gauges["vms"] = 0
    code, _, body = await http(addr, get("/metrics?x=1"))
    fams = parse_exposition(body.decode())
    assert code == 200
    assert value(fams, "livemig_migrations_completed_total", direction="outbound") == 1
    assert value(fams, "livemig_vms") == 0


@pytest.mark.asyncio
async def test_head_404_405(server):
    _, addr, _, _ = server
    code, headers, body = await http(addr, get(method="HEAD"))
    assert code == 200 and body == b"" and int(headers["content-length"]) > 0
    code, _, _ = await http(addr, get("/"))
    assert code == 404
    code, _, _ = await http(addr, get("/metricsx"))
    assert code == 404
    code, headers, _ = await http(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert code == 405 and headers["allow"] == "GET, HEAD"
    code, _, _ = await http(addr, get(method="DELETE"))
    assert code == 405


async def closed_by_server(addr, raw: bytes) -> bytes:
    """Send garbage; the server must answer (or not) and close: read() reaches EOF."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_bad_clients_are_closed_and_the_server_keeps_serving(server):
    srv, addr, _, _ = server
    data = await closed_by_server(addr, b"\x00\xff\xfe garbage \x01\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 ")
    data = await closed_by_server(addr, b"GET /metrics\r\n\r\n")            # HTTP/0.9 style: no version
    assert data.startswith(b"HTTP/1.1 400 ")
    data = await closed_by_server(addr, b"A" * 20000)                      # head larger than the bound
    assert data.startswith(b"HTTP/1.1 431 ")
    data = await closed_by_server(addr, b"GET /metrics HTTP/1.1\r\n")      # never finishes its head
    assert data.startswith(b"HTTP/1.1 408 ")
    # a client that connects and hangs up at once
    _, w = await asyncio.open_connection(*addr)
    w.close()
    # many at once, then a normal scrape still works
    await asyncio.gather(*(closed_by_server(addr, b"\r\n\r\n" + bytes(range(256))) for _ in range(20)))
    code, _, body = await http(addr, get())
    assert code == 200 and b"livemig_vms" in body
    async with asyncio.timeout(5):
        while srv._clients:                  # every client task ended
            await asyncio.sleep(0.01)  # poll: condition loop under asyncio.timeout


@pytest.mark.asyncio
async def test_close_stops_serving():
    srv = MetricsServer(Registry(), "127.0.0.1", 0)
    addr = await srv.start()
    code, _, body = await http(addr, get())
    assert code == 200 and body == b"\n"
    await srv.close()
    with pytest.raises(OSError):
        await asyncio.open_connection(*addr)


def test_metrics_listen_in_the_config_file(tmp_path):
    from agent.daemon.config import ConfigError, load_config

    path = tmp_path / "agent.toml"
    path.write_text('[security]\nmode = "insecure"\n\n[metrics]\nlisten = "127.0.0.1:9101"\n')
    assert load_config(path).metrics.listen == "127.0.0.1:9101"
    assert load_config(None, {"security.mode": "insecure"}).metrics.listen == ""          # off by default
    path.write_text('[security]\nmode = "insecure"\n\n[metrics]\nlisten = "9101"\n')
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_config(path)
    path.write_text('[security]\nmode = "insecure"\n\n[metrics]\nlisen = "127.0.0.1:9101"\n')
    with pytest.raises(ConfigError, match="did you mean metrics.listen"):
        load_config(path)
