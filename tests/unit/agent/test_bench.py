"""agent.bench: statistics helpers, target evaluation, and one real (tiny) end-to-end run."""
from __future__ import annotations

import json
import math
import os

import pytest

from agent.bench import bench
from agent.bench.bench import (GiB, MiB, RunRecord, SCENARIOS, BenchConfig, Target, aggregate, evaluate_targets,
                         format_markdown, format_table, linear_fit, post_process, report_metrics, summarize)
from tests.conftest import leftovers


# ---------------------------------------------------------------------------- statistics
def test_summarize_median_min_max():
    assert summarize([3, 1, 2]) == {"median": 2, "min": 1, "max": 3, "n": 3}
    assert summarize([4.0, 1.0, 2.0, 3.0]) == {"median": 2.5, "min": 1, "max": 4, "n": 4}
    assert summarize([7]) == {"median": 7, "min": 7, "max": 7, "n": 1}


def test_summarize_ignores_none_and_bools_and_is_none_when_empty():
    assert summarize([None, 5, None, 1]) == {"median": 3, "min": 1, "max": 5, "n": 2}
    assert summarize([True, 2]) == {"median": 2, "min": 2, "max": 2, "n": 1}
    assert summarize([]) is None
    assert summarize([None]) is None


def test_linear_fit_exact_line():
    slope, icpt, r2 = linear_fit([0.25, 1.0, 4.0], [2 * 0.25 + 1, 2 * 1.0 + 1, 2 * 4.0 + 1])
    assert slope == pytest.approx(2.0)
    assert icpt == pytest.approx(1.0)
    assert r2 == pytest.approx(1.0)


def test_linear_fit_known_noisy_data():
    # By hand: mean x 2.5, mean y 3.75, Sxy 3.5, Sxx 5 -> slope 0.7, intercept 2.0,
    # SS_res 2.3, SS_tot 4.75 -> R² = 1 - 2.3/4.75.
    slope, icpt, r2 = linear_fit([1, 2, 3, 4], [2, 4, 5, 4])
    assert slope == pytest.approx(0.7)
    assert icpt == pytest.approx(2.0)
    assert r2 == pytest.approx(1 - 2.3 / 4.75)


def test_linear_fit_flat_and_degenerate():
    assert linear_fit([1, 2, 3], [5, 5, 5]) == (pytest.approx(0.0), pytest.approx(5.0), 1.0)
    with pytest.raises(ValueError):
        linear_fit([1], [1])
    with pytest.raises(ValueError):
        linear_fit([2, 2], [1, 3])


# ---------------------------------------------------------------------------- metrics from a report
def _report(**over) -> dict:
    r = {"status": "completed", "error": None, "total_ms": 2000.0, "downtime_ms": 12.5, "iterations": 3,
         "pages_sent": 262144, "zero_pages": 0, "bytes_sent": GiB, "wire_bytes": GiB + 4096, "ram_bytes": GiB,
         "throughput_gibps": 2.0, "throttle_pct": 0, "verified": True, "verify_ms": 80.0, "prefault_ms": 550.0,
         "guest_rate_before_pps": 20000, "guest_rate_during_pps": 19990, "writes_at_pause": 130000,
         "started_at": 1000.0, "stop_copy_pages": 10,
         "phases": {"queued": 0.1, "negotiate": 5.0, "setup": 600.0, "precopy": 400.0, "stop-and-copy": 100.0,
                    "verify": 80.0, "resume": 10.0, "commit": 5.0}}
    r.update(over)
    return r


def test_report_metrics_throughput_is_payload_over_transfer_phases():
    m = report_metrics(_report(), before_writes=100000, t_before=999.0)
    assert m["transfer_ms"] == 500
    assert m["throughput_gibps"] == pytest.approx(2.0)          # 1 GiB in 0.5 s
    assert m["effective_gibps"] == pytest.approx(0.5)           # 1 GiB in 2 s end to end
    assert m["setup_ms"] == 605
    assert m["sent_ratio"] == 1
    assert m["rounds"] == 3 and m["verified"] is True
    # pause at 1000 + (5 + 600 + 400) ms = 1001.005 s; 30000 writes since 999.0 s
    assert m["guest_rate_avg_pps"] == round(30000 / 2.005)


def test_report_metrics_tolerates_missing_fields():
    m = report_metrics({"status": "failed", "phases": {}})
    assert m["throughput_gibps"] is None and m["sent_ratio"] is None and m["verified"] is False


# ---------------------------------------------------------------------------- aggregation and targets
def _run(ok=True, **metrics) -> RunRecord:
    return RunRecord(ok=ok, error=None if ok else "boom", metrics=dict(metrics))


def _results() -> dict:
    cfg = BenchConfig()
    res = {
        "idle-1g": aggregate(SCENARIOS["idle-1g"], cfg, [
            _run(total_ms=2000, ratio_to_tcp=0.95, verified=True),
            _run(total_ms=1800, ratio_to_tcp=0.91, verified=True),
            _run(total_ms=2200, ratio_to_tcp=0.85, verified=True)]),
        "zero-1g": aggregate(SCENARIOS["zero-1g"], cfg, [_run(total_ms=150, verified=True)]),
        "hotset-1g": aggregate(SCENARIOS["hotset-1g"], cfg, [
            _run(downtime_ms=15, sent_ratio=1.1, rounds=4, verified=True),
            _run(ok=False, verified=False)]),
        "hotset-1g-hot": aggregate(SCENARIOS["hotset-1g-hot"], cfg, [
            _run(downtime_ms=250, total_ms=20000, time_budget_ms=25815.1, throttle_pct=50, verified=True),
            _run(downtime_ms=320, total_ms=21000, time_budget_ms=25815.1, throttle_pct=60, verified=True)]),
        "scale": aggregate(SCENARIOS["scale"], cfg, [_run(ok=False, verified=False)]),
    }
    post_process(res)
    return res


def test_aggregate_shape_and_verdicts():
    res = _results()
    idle = res["idle-1g"]
    assert idle["total_ms"] == {"median": 2000, "min": 1800, "max": 2200, "n": 3}
    assert idle["verified"] is True and idle["completed"] is True and idle["runs_completed"] == 3
    hs = res["hotset-1g"]
    assert hs["runs_requested"] == 2 and hs["runs_completed"] == 1
    assert hs["verified"] is False and hs["completed"] is False and hs["errors"] == ["boom"]
    assert hs["downtime_ms"]["n"] == 1                 # only completed runs make figures
    assert res["zero-1g"]["ratio_to_idle_total"]["median"] == pytest.approx(150 / 2000)


def test_evaluate_targets_pass_miss_and_not_run():
    res = _results()
    got = {(t["scenario"], t["target"]): t for t in evaluate_targets(res)}

    def status(scen, prefix):
        [t] = [t for (s, txt), t in got.items() if s == scen and txt.startswith(prefix)]
        return t["status"], t["measured"]

    assert status("idle-1g", "ratio_to_tcp") == ("PASS", 0.91)
    assert status("idle-1g", "moonshot") == ("MISS", 0.91)
    assert status("zero-1g", "total time") == ("PASS", pytest.approx(0.075))
    assert status("hotset-1g", "downtime") == ("PASS", 15)
    assert status("hotset-1g", "verified in every run") == ("MISS", 0.5)
    assert status("hotset-1g", "bytes sent") == ("PASS", 1.1)
    assert status("hotset-1g", "converges") == ("PASS", 4)
    assert status("hotset-1g-hot", "completes every time") == ("PASS", 1.0)
    assert status("hotset-1g-hot", "downtime") == ("MISS", 320)   # the worst run counts
    assert status("hotset-1g-hot", "total time") == ("PASS", 20500)
    st, v = status("scale", "R²")
    assert st == "MISS" and v is None                                # no figure is a miss, never assumed
    assert "no figure" in [t for (s, x), t in got.items() if s == "scale" and x.startswith("R²")][0]["shown"]

    only_idle = evaluate_targets({"idle-1g": res["idle-1g"]})
    assert {t["status"] for t in only_idle if t["scenario"] != "idle-1g"} == {"NOT RUN"}


def test_evaluate_targets_threshold_from_results():
    t = Target("s", "x <= budget", lambda r: r["x"]["median"], "<=", lambda r: r["budget"])
    assert evaluate_targets({"s": {"x": {"median": 5}, "budget": 6}}, [t])[0]["status"] == "PASS"
    assert evaluate_targets({"s": {"x": {"median": 7}, "budget": 6}}, [t])[0]["status"] == "MISS"


def test_tables_render_from_a_synthetic_document():
    res = _results()
    doc = {"started_at": "2026-01-01T00:00:00", "mode": "quick", "runs": 1, "duration_s": 1.0,
           "machine": {"cpu_count": 2, "cpu_model": "x", "mem_total_gib": 1, "kernel": "k", "python": "3.11",
                       "uvloop": "0.23", "git": "abc"},
           "baseline": {"bytes": GiB, "method": "m", "gibps": {"median": 4.4, "min": 4, "max": 4.6}, "runs": 3,
                        "verified": True},
           "scenarios": res, "targets": evaluate_targets(res), "errors": ["hotset-1g: boom"]}
    text = format_table(doc)
    assert "idle-1g" in text and "2000 [1800-2200]" in text and "MISS" in text
    md = format_markdown(doc)
    assert "| idle-1g |" in md and "## Targets" in md


def test_usage_errors_exit_2(capsys):
    assert bench.main(["--only", "no-such-scenario"]) == 2
    assert bench.main(["--runs", "0", "--only", "idle-1g"]) == 2
    assert "unknown scenario" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end (real agents)
@pytest.mark.timeout(60)
def test_tiny_end_to_end_run(tmp_path, shm_prefix, capsys):
    out = tmp_path / "results"
    rc = bench.main(["--tiny", "--only", "idle-1g,zero-1g", "--json", "--out", str(out),
                     "--shm-prefix", shm_prefix])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0, doc["errors"]
    assert doc["ok"] is True and doc["mode"] == "tiny" and doc["runs"] == 1
    for k in ("cpu_count", "cpu_model", "kernel", "python", "uvloop"):
        assert doc["machine"][k]
    base = doc["baseline"]
    assert base["verified"] is True and base["bytes"] == GiB // bench.TINY_DIVISOR
    assert base["gibps"]["median"] > 0
    idle = doc["scenarios"]["idle-1g"]
    assert idle["config"]["memory"] == "64M"
    for k in ("total_ms", "downtime_ms", "rounds", "bytes_sent", "ram_bytes", "throughput_gibps", "ratio_to_tcp"):
        assert set(idle[k]) == {"median", "min", "max", "n"}, k
        assert idle[k]["min"] <= idle[k]["median"] <= idle[k]["max"]
    assert idle["ram_bytes"]["median"] == 64 * MiB
    assert idle["bytes_sent"]["median"] == 64 * MiB          # random fill: every page crosses the wire
    assert idle["verified"] is True and idle["runs_completed"] == 1
    [run] = idle["runs"]
    m = run["metrics"]                                       # ratio against the raw-TCP run just before it
    assert m["paired_tcp_gibps"] > 0
    assert math.isclose(m["ratio_to_tcp"], m["throughput_gibps"] / m["paired_tcp_gibps"], rel_tol=1e-3)
    assert math.isclose(m["ratio_to_baseline"], m["throughput_gibps"] / base["gibps"]["median"], rel_tol=1e-3)
    assert run["reports"][0]["status"] == "completed" and run["metrics"]["dest_running"] is True
    assert idle["dest_running"] is True and idle["source_released"] is True
    zero = doc["scenarios"]["zero-1g"]
    assert zero["bytes_sent"]["median"] == 0 and zero["zero_pages"]["median"] == 64 * MiB // 4096
    assert zero["ratio_to_idle_total"]["median"] > 0
    targets = {(t["scenario"], t["target"]): t["status"] for t in doc["targets"]}
    assert {s for (sc, _), s in targets.items() if sc in ("idle-1g", "zero-1g")} <= {"PASS", "MISS"}
    assert {s for (sc, _), s in targets.items() if sc == "scale"} == {"NOT RUN"}
    files = sorted(os.listdir(out))
    assert "latest.json" in files and "latest.md" in files
    assert any(f.startswith("bench-") and f.endswith(".json") for f in files)
    assert any(f.startswith("bench-") and f.endswith(".md") for f in files)
    assert json.loads((out / "latest.json").read_text())["scenarios"].keys() == {"idle-1g", "zero-1g"}
    segs, procs = leftovers(shm_prefix)                       # the fixture checks again after the test
    assert not segs and not procs
