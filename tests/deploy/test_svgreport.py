"""agent.svgreport: valid XML, the key numbers present, 0/1/30 rounds, failed migrations, the time
axis, the log-scale rounds, the bandwidth cap and downtime target, the job id and date."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from agent.migration.jobs import Job
from agent.migration.phases import TRANSITIONS, MigrationPhase
from agent.observe.svgreport import fmt_ms, log_ticks, nice_ticks, render_svg

pytestmark = pytest.mark.timeout(30)
NS = "{http://www.w3.org/2000/svg}"


def happy_path() -> list[str]:
    """The longest forward path queued -> ... -> commit in phases.TRANSITIONS (no aborts, no requeue)."""
    aborts = {MigrationPhase.CANCELLING, MigrationPhase.ROLLING_BACK, MigrationPhase.QUEUED}
    best: list = []

    def walk(p, seen):
        nonlocal best
        if p is MigrationPhase.COMMIT and len(seen) > len(best):
            best = list(seen)
        for q in TRANSITIONS[p]:
            if q not in aborts and q not in seen:
                walk(q, seen + [q])

    walk(MigrationPhase.QUEUED, [MigrationPhase.QUEUED])
    names = [p.value for p in best]
    assert {"precopy", "stop-and-copy", "verify", "resume", "commit"} <= set(names), names
    return names


def make_report(n_rounds: int, status: str = "completed", **over) -> dict:
    """A report as ``Job.report()`` builds it (the real dict, its stats filled in)."""
    job = Job(vm="vm1", source="198.18.0.1:7700", destination="198.18.0.2:7700", direction="outbound",
              job_id="abc123def456")
    st = job.stats
    st.ram_bytes = 128 * 2**20
    st.pages_total = 32768
    rounds = []
    for i in range(1, n_rounds + 1):
        sent = 32768 if i == 1 else max(16, 12000 // i)
        rounds.append({"round": i, "pages_sent": sent, "dirty_pages": sent // 3, "ms": sent * 4096 / 119e6 * 1000,
                       "bandwidth_bps": 119_000_000 + 1_000_000 * (i % 3), "throttle_pct": 0 if i < 4 else 20})
    st.round_log = rounds
    st.rounds = n_rounds
    st.pages_sent = sum(r["pages_sent"] for r in rounds)
    st.bytes_sent = st.pages_sent * 4096
    st.downtime_ms = 37.25
    st.stop_copy_pages = rounds[-1]["pages_sent"] if rounds else 0
    if status == "completed":
        ms = {"queued": 0.2, "negotiate": 2.1, "setup": 84.8, "precopy": sum(r["ms"] for r in rounds[:-1]),
              "stop-and-copy": rounds[-1]["ms"] if rounds else 0.0, "verify": 32.4, "resume": 2.4, "commit": 34.6}
        phases = {p: ms[p] for p in happy_path()}          # in the order the current driver visits them
        job.verified = True
    else:
        phases = {"queued": 0.2, "negotiate": 2.1, "setup": 84.8, "precopy": 812.5, "rolling-back": 3.1}
        job.error = "peer lost during precopy"
    path = list(phases) + [status]
    for old, new in zip(path, path[1:]):                 # walk the real transitions to the final phase
        job.tracker.set_phase(expected=MigrationPhase(old), new=MigrationPhase(new))
    job.tracker.durations_ms = dict(phases)              # with chosen durations
    job.started_at = job.queued_at
    job.finished_at = job.queued_at + sum(phases.values()) / 1000
    r = job.report()
    r.update(over)
    return r


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg.encode("utf-8"))
    assert root.tag == NS + "svg"
    assert root.get("width") == "900" and root.get("height") == "600"
    return root


def texts(root: ET.Element) -> str:
    return "\n".join("".join(t.itertext()) for t in root.iter(NS + "text"))


def round_bars(root: ET.Element) -> list[str]:
    return [t.text for t in root.iter(NS + "title") if t.text and t.text.startswith("round ") and "pages sent" in t.text]


@pytest.mark.parametrize("n", [1, 2, 5, 30])
def test_completed_report(n):
    r = make_report(n)
    assert r["status"] == "completed" and len(r["rounds"]) == n
    root = parse(render_svg(r))
    t = texts(root)
    assert "vm1: 198.18.0.1:7700 \u2192 198.18.0.2:7700" in t
    assert "completed \u00b7 verified" in t
    assert f"total {fmt_ms(r['total_ms'])}" in t
    assert "downtime 37.2 ms" in t or "downtime 37.3 ms" in t      # round(37.25, 1) either way
    assert "RAM 128.0 MiB" in t
    assert f"{n} round" in t
    for phase in ("precopy", "stop-and-copy", "verify", "resume", "commit"):
        assert f"{phase} {fmt_ms(r['phases'][phase])}" in t         # legend: every phase with its duration
    assert f"pause: downtime {r['downtime_ms']} ms" in t              # the report's figure, as it stands
    # the pause box spans stop-and-copy .. resume, whatever sits between
    names = list(r["phases"])
    paused = names[names.index("stop-and-copy"): names.index("resume") + 1]
    total = sum(r["phases"].values())
    expect_w = sum(r["phases"][p] for p in paused) / total * 800
    boxes = [e for e in root.iter(NS + "rect") if e.get("stroke") == "#d62728" and e.get("fill") == "none"]
    assert len(boxes) == 1 and float(boxes[0].get("width")) == pytest.approx(max(expect_w, 6.0), abs=0.05)
    assert len(round_bars(root)) == 2 * n                          # pages sent + dirty per round
    assert "round 1: 32768 pages sent" in "\n".join(round_bars(root))
    bw_points = [c for c in root.iter(NS + "circle")]
    assert len(bw_points) == n
    if n >= 2:
        assert len(list(root.iter(NS + "polyline"))) == 1
    if n >= 4:
        assert "20%" in t                                          # throttle change is annotated


def test_failed_report_has_no_verify_or_resume():
    r = make_report(4, status="failed")
    assert "verify" not in r["phases"] and "resume" not in r["phases"]
    root = parse(render_svg(r))
    t = texts(root)
    assert "failed \u00b7 not verified" in t
    assert "error: peer lost during precopy" in t
    assert "rolling-back 3.1 ms" in t
    assert "pause: downtime" not in t                              # never paused
    assert len(round_bars(root)) == 8


def test_empty_and_odd_reports_still_render():
    for r in ({}, {"status": "failed", "phases": {}, "rounds": []},
              {"status": "cancelled", "phases": {"queued": 3.0, "cancelling": 0.1, "negotiate": "x"},
               "rounds": [{"round": 1}], "total_ms": None, "bytes_sent": "junk"}):
        root = parse(render_svg(r))
        assert root.find(f"{NS}text") is not None


def test_text_is_escaped():
    r = make_report(2, vm='<vm&"1\'>', error="bad <frame> & more", status="failed")
    svg = render_svg(r)
    t = texts(parse(svg))
    assert '<vm&"1\'>' in t and "bad <frame> & more" in t


def test_zero_page_rounds_have_no_bandwidth_point():
    r = make_report(2)
    r["rounds"][1].update(pages_sent=0, dirty_pages=0, ms=0.0, bandwidth_bps=0)
    root = parse(render_svg(r))
    assert len(list(root.iter(NS + "circle"))) == 1
    assert "0.0 kbit/s" not in texts(root)


def test_nice_ticks():
    assert nice_ticks(0) == [0.0, 1.0]
    assert nice_ticks(32768) == [0, 10000, 20000, 30000, 40000]
    assert nice_ticks(0.98)[-1] >= 0.98
    for v in (1, 7, 123, 9999, 1.5e9):
        ticks = nice_ticks(v)
        assert ticks[0] == 0 and ticks[-1] >= v and len(ticks) <= 7


def by_class(root: ET.Element, cls: str) -> list[ET.Element]:
    return [e for e in root.iter() if e.get("class") == cls]


def test_pause_label_is_the_reports_downtime():
    for downtime in (37.2, 1234.5, 3.0, 0.4):
        r = make_report(3, downtime_ms=downtime)
        labels = by_class(parse(render_svg(r)), "pause-label")
        assert [e.text for e in labels] == [f"pause: downtime {r['downtime_ms']:g} ms"], downtime


def test_time_axis_job_id_and_date():
    r = make_report(5)
    r["started_at"] = 1717243200.0                                   # 2024-06-01 12:00:00 UTC
    root = parse(render_svg(r))
    assert len(by_class(root, "time-axis")) == 1
    ticks = [e.text for e in by_class(root, "time-tick")]
    assert ticks[0] == "0 ms" and len(ticks) >= 3
    total = sum(r["phases"].values())
    xs = [float(e.get("x")) for e in by_class(root, "time-tick")]
    assert xs == sorted(xs) and xs[0] == 70 and xs[-1] <= 870           # within the bar, in order
    job = by_class(root, "job")[0].text
    assert "job abc123def456" in job and "2024-06-01 12:00:00 UTC" in job


def test_rounds_on_a_log_scale_keep_late_rounds_visible():
    r = make_report(30)
    root = parse(render_svg(r))
    assert "pages per round (log scale)" in texts(root)
    assert [e.text for e in by_class(root, "log-tick")] == ["1", "10", "100", "1.0k", "10k", "100k"]
    bars = {t.text: p for p in root.iter(NS + "rect") for t in p.iter(NS + "title")
            if t.text and "pages sent" in t.text and p.get("fill") == "#4e79a7"}
    first = float(bars[next(k for k in bars if k.startswith("round 1:"))].get("height"))
    last = float(bars[next(k for k in bars if k.startswith("round 30:"))].get("height"))
    # 32768 vs 400 pages: linear would make the last bar 1/80 of the first; log keeps it above half
    assert last > first / 2 > 0


def test_cap_and_target_drawn_when_the_report_has_them():
    plain = parse(render_svg(make_report(4)))
    for cls in ("bandwidth-cap", "cap-label", "downtime-target", "target-label", "threshold"):
        assert by_class(plain, cls) == [], cls                        # not in the report: not drawn
    r = make_report(4, max_bandwidth_mibps=16, downtime_target_ms=300)
    root = parse(render_svg(r))
    caps = by_class(root, "bandwidth-cap")
    assert len(caps) == 4 and len({c.get("y1") for c in caps}) == 1   # one cap, every round
    assert [e.text for e in by_class(root, "cap-label")] == ["cap 16.0 MiB/s"]      # one unit: MiB/s
    assert [e.text for e in by_class(root, "target-label")] == ["downtime target 300 ms"]
    assert len(by_class(root, "downtime-target")) == 1
    assert len(by_class(root, "threshold")) == 4                       # bandwidth x target, per round
    # the cap sits at its value on the bandwidth axis: below the ~113 MiB/s rounds
    cap_y = float(caps[0].get("y1"))
    points = [float(c.get("cy")) for c in root.iter(NS + "circle")]
    assert all(cap_y > py for py in points)
    # a tuned cap per round (job set) steps; a target exceeded says so
    r["rounds"][2]["max_bandwidth_mibps"] = 64
    r["downtime_ms"] = 450.0
    root = parse(render_svg(r))
    assert len({c.get("y1") for c in by_class(root, "bandwidth-cap")}) == 2
    assert by_class(root, "target-label")[0].text == "downtime target 300 ms (exceeded)"
    for junk in ({"max_bandwidth_mibps": "fast", "downtime_target_ms": -3}, {"max_bandwidth_mibps": 0}):
        root = parse(render_svg(make_report(2, **junk)))
        assert by_class(root, "bandwidth-cap") == [] and by_class(root, "downtime-target") == []


def test_log_ticks():
    assert log_ticks(0) == [1.0, 10.0] and log_ticks(1) == [1.0, 10.0]
    assert log_ticks(32768) == [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0]
    assert log_ticks(1000) == [1.0, 10.0, 100.0, 1000.0]
