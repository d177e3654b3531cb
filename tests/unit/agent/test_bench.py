"""agent.bench: statistics helpers, target evaluation, and one real (tiny) end-to-end run."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from agent.bench import bench, rawtcp
from agent.bench.bench import (GiB, MiB, RunRecord, SCENARIOS, BenchConfig, Target, aggregate, evaluate_targets,
                         format_markdown, format_table, linear_fit, paired_metrics, post_process, report_metrics,
                         scale_fit, summarize)
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
    assert m["streams"] is None                                  # optional in a report: absent -> null


def test_report_metrics_records_the_negotiated_streams():
    assert report_metrics(_report(streams=2))["streams"] == 2


# ---------------------------------------------------------------------------- paired raw runs, scale fit
def _raw(ms: float, nbytes: int = GiB, verified: bool = True) -> dict:
    """A rawtcp.measure result of one run (the fields the bench reads)."""
    g = nbytes / (ms / 1000.0) / GiB
    return {"mode": "m", "ms": {"median": ms, "min": ms, "max": ms}, "verified": verified,
            "gibps": {"median": g, "min": g, "max": g}}


def test_paired_metrics_against_the_three_raw_runs():
    pair = {"tcp": _raw(250.0), "e2e": _raw(800.0), "e2e_2conn": _raw(500.0)}
    m = paired_metrics({"throughput_gibps": 2.0, "total_ms": 1200.0}, pair)
    assert m["paired_tcp_gibps"] == pytest.approx(4.0)
    assert m["ratio_to_tcp"] == pytest.approx(0.5)               # 2.0 / 4.0
    assert m["paired_e2e_ms"] == 800 and m["paired_e2e_gibps"] == pytest.approx(1.25)
    assert m["total_vs_e2e"] == pytest.approx(1.5)               # 1200 / 800
    assert m["paired_tcp2_ms"] == 500 and m["paired_tcp2_gibps"] == pytest.approx(2.0)
    assert m["ratio_to_tcp2"] == pytest.approx(1.0)              # 2.0 / 2.0
    assert m["total_vs_e2e_2conn"] == pytest.approx(2.4)         # 1200 / 500


def test_paired_metrics_without_a_rate_or_a_verified_run_gives_no_figure():
    pair = {"e2e": _raw(1000.0, 2 * GiB), "e2e_2conn": _raw(600.0, 2 * GiB, verified=False)}
    m = paired_metrics({"total_ms": 1500.0}, pair)               # drain: a total, no payload rate
    assert m == {"paired_e2e_ms": 1000, "paired_e2e_gibps": pytest.approx(2.0), "total_vs_e2e": pytest.approx(1.5)}
    assert paired_metrics({"throughput_gibps": 1.0}, {}) == {}


def test_pair_modes_are_prefaulted_1conn_then_fresh_1_and_2_connections():
    assert list(bench.PAIR_MODES) == ["tcp", "e2e", "e2e_2conn"]
    assert [(m.fresh, m.connections) for m in bench.PAIR_MODES.values()] == [(False, 1), (True, 1), (True, 2)]


def test_scale_fit_slope_against_e2e_raw_slope():
    gibs = [0.25, 1.0, 4.0]
    totals = [700 + 1000 * g for g in gibs]                      # 1000 ms/GiB + 700 ms
    setups = [200 + 400 * g for g in gibs]                       # without setup: 600 ms/GiB + 500 ms
    e2e = [50 + 800 * g for g in gibs]                           # raw e2e: 800 ms/GiB
    f = scale_fit(gibs, totals, setups, e2e)
    assert f["slope_ms_per_gib"] == 1000 and f["intercept_ms"] == 700 and f["r2"] == 1
    assert f["slope_nosetup_ms_per_gib"] == 600 and f["r2_nosetup"] == 1
    assert f["e2e_slope_ms_per_gib"] == 800 and f["e2e_intercept_ms"] == 50 and f["e2e_r2"] == 1
    assert f["slope_vs_e2e"] == pytest.approx(1.25)
    g = scale_fit(gibs, totals, setups, [100.0, None, 3000.0])   # a raw run that did not verify: no e2e figures
    assert "slope_vs_e2e" not in g and "e2e_slope_ms_per_gib" not in g and g["r2"] == 1


# ---------------------------------------------------------------------------- raw TCP modes
@pytest.mark.parametrize("nbytes,n", [(64 * MiB, 2), (64 * MiB + 4096, 3), (3 * MiB, 2), (4096, 8), (0, 2),
                                      (33 * MiB, 1), (40 * MiB, 8)])
def test_split_chunks_covers_every_byte_once_round_robin(nbytes, n):
    per = rawtcp.split_chunks(nbytes, n)
    assert len(per) == n
    flat = sorted(c for conn in per for c in conn)
    assert rawtcp.tiles(flat, nbytes)
    seen = bytearray(nbytes)                                     # every byte exactly once, by hand
    for off, ln in flat:
        assert 0 < ln <= rawtcp.STREAM_CHUNK
        for b in range(off, off + ln, 4096):
            seen[b] += 1
    assert all(seen[b] == 1 for b in range(0, nbytes, 4096))
    for k, conn in enumerate(per):                               # chunk i on connection i % n, in order
        assert [off // rawtcp.STREAM_CHUNK % n for off, _ in conn] == [k] * len(conn)
        assert conn == sorted(conn)


def test_tiles_rejects_gaps_overlaps_and_short_cover():
    assert rawtcp.tiles([(0, 4), (4, 4)], 8)
    assert not rawtcp.tiles([(0, 4), (5, 3)], 8)                 # gap
    assert not rawtcp.tiles([(0, 4), (2, 6)], 8)                 # overlap
    assert not rawtcp.tiles([(0, 4), (0, 4), (4, 4)], 8)         # a chunk twice
    assert not rawtcp.tiles([(0, 4)], 8)                         # short


def test_mode_names_and_limits():
    assert rawtcp.Mode().method == rawtcp.METHOD                 # the default is the original baseline
    assert rawtcp.Mode().name == "prefaulted-1conn"
    assert rawtcp.Mode(fresh=True, connections=2).name == "fresh-2conn"
    assert "fresh" in rawtcp.Mode(fresh=True).method and "2 TCP connections" in rawtcp.Mode(connections=2).method
    for bad in (0, 9):
        with pytest.raises(ValueError):
            rawtcp.Mode(connections=bad)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fresh,n", [(False, 1), (True, 1), (True, 2), (False, 3)])
def test_rawtcp_modes_verify(shm_prefix, fresh, n):
    r = rawtcp.measure(32 * MiB, runs=1, prefix=shm_prefix, fresh=fresh, connections=n)
    assert r["verified"] is True and r["per_run"][0]["bytes"] == 32 * MiB
    assert r["fresh"] is fresh and r["connections"] == n and r["mode"] == rawtcp.Mode(fresh, n).name
    assert r["method"] == rawtcp.Mode(fresh, n).method
    assert r["chunk_bytes"] == (rawtcp.CHUNK if n == 1 else rawtcp.STREAM_CHUNK)
    assert r["gibps"]["median"] > 0 and r["ms"]["median"] > 0
    assert not [x for x in os.listdir("/dev/shm") if x.startswith(shm_prefix)]   # fresh files unlinked too


@pytest.mark.timeout(60)
def test_rawtcp_measure_modes_shares_one_source(shm_prefix):
    res = rawtcp.measure_modes(16 * MiB, bench.PAIR_MODES, runs=1, prefix=shm_prefix)
    assert list(res) == ["tcp", "e2e", "e2e_2conn"]
    assert all(r["verified"] and r["bytes"] == 16 * MiB for r in res.values())
    assert [r["mode"] for r in res.values()] == ["prefaulted-1conn", "fresh-1conn", "fresh-2conn"]


@pytest.mark.timeout(60)
def test_rawtcp_cli_fresh_two_connections(capsys):
    assert rawtcp.main(["--mib", "16", "--runs", "1", "--fresh", "--connections", "2"]) == 0
    assert "fresh destination, 2 connections" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        rawtcp.main(["--connections", "9"])


# ---------------------------------------------------------------------------- aggregation and targets
def _run(ok=True, **metrics) -> RunRecord:
    return RunRecord(ok=ok, error=None if ok else "boom", metrics=dict(metrics))


def _results() -> dict:
    cfg = BenchConfig()
    res = {
        "idle-1g": aggregate(SCENARIOS["idle-1g"], cfg, [
            _run(total_ms=2000, ratio_to_tcp=0.95, total_vs_e2e=1.1, ratio_to_tcp2=0.6, verified=True),
            _run(total_ms=1800, ratio_to_tcp=0.91, total_vs_e2e=1.3, ratio_to_tcp2=0.5, verified=True, streams=2),
            _run(total_ms=2200, ratio_to_tcp=0.85, total_vs_e2e=1.15, ratio_to_tcp2=0.4, verified=True,
                 streams=2)]),
        "zero-1g": aggregate(SCENARIOS["zero-1g"], cfg, [_run(total_ms=150, verified=True)]),
        "hotset-1g": aggregate(SCENARIOS["hotset-1g"], cfg, [
            _run(downtime_ms=9, sent_ratio=1.1, rounds=4, verified=True),
            _run(downtime_ms=8, sent_ratio=1.1, rounds=4, verified=True),
            _run(downtime_ms=21, sent_ratio=1.1, rounds=4, verified=True),
            _run(ok=False, verified=False)]),
        "hotset-1g-hot": aggregate(SCENARIOS["hotset-1g-hot"], cfg, [
            _run(downtime_ms=250, total_ms=20000, time_budget_ms=25815.1, throttle_pct=50, verified=True),
            _run(downtime_ms=320, total_ms=21000, time_budget_ms=25815.1, throttle_pct=60, verified=True)]),
        "scale": aggregate(SCENARIOS["scale"], cfg, [_run(ok=False, verified=False)]),
        "drain": aggregate(SCENARIOS["drain"], cfg, [
            _run(total_ms=3000, drain_ms=3000, ratio_to_sequential=0.8, total_vs_e2e=2.5, verified=True)]),
    }
    post_process(res)
    return res


def test_aggregate_shape_and_verdicts():
    res = _results()
    idle = res["idle-1g"]
    assert idle["total_ms"] == {"median": 2000, "min": 1800, "max": 2200, "n": 3}
    assert idle["verified"] is True and idle["completed"] is True and idle["runs_completed"] == 3
    assert idle["total_vs_e2e"] == {"median": 1.15, "min": 1.1, "max": 1.3, "n": 3}
    assert idle["streams"] == {"median": 2, "min": 2, "max": 2, "n": 2}    # absent in a report: not counted
    hs = res["hotset-1g"]
    assert hs["runs_requested"] == 4 and hs["runs_completed"] == 3
    assert hs["verified"] is False and hs["completed"] is False and hs["errors"] == ["boom"]
    assert hs["downtime_ms"]["n"] == 3                 # only completed runs make figures
    assert hs["streams"] is None                       # no report said: null
    assert res["zero-1g"]["ratio_to_idle_total"]["median"] == pytest.approx(150 / 2000)


def test_evaluate_targets_pass_miss_and_not_run():
    res = _results()
    got = {(t["scenario"], t["target"]): t for t in evaluate_targets(res)}

    def status(scen, prefix):
        [t] = [t for (s, txt), t in got.items() if s == scen and txt.startswith(prefix)]
        return t["status"], t["measured"]

    assert status("idle-1g", "total <= 1.2 x paired e2e") == ("PASS", 1.15)
    assert status("idle-1g", "one stream") == ("PASS", 0.91)
    assert status("idle-1g", "with parallel streams") == ("MISS", 0.91)
    assert status("zero-1g", "total time") == ("PASS", pytest.approx(0.075))
    assert status("hotset-1g", "downtime median") == ("PASS", 9)
    assert status("hotset-1g", "downtime <= 20 ms in every run") == ("MISS", 21)   # the worst run counts
    assert status("hotset-1g", "verified in every run") == ("MISS", 0.75)
    assert status("hotset-1g", "bytes sent") == ("PASS", 1.1)
    assert status("hotset-1g", "converges") == ("PASS", 4)
    assert status("hotset-1g-hot", "completes every time") == ("PASS", 1.0)
    assert status("hotset-1g-hot", "downtime") == ("MISS", 320)   # the worst run counts
    assert status("hotset-1g-hot", "total time") == ("PASS", 20500)
    st, v = status("scale", "R²")
    assert st == "MISS" and v is None                                # no figure is a miss, never assumed
    assert "no figure" in [t for (s, x), t in got.items() if s == "scale" and x.startswith("R²")][0]["shown"]
    assert status("scale", "slope") == ("MISS", None)
    assert status("drain", "2 at once") == ("PASS", 0.8)
    assert {t["issue"] for t in got.values()} == {3, 12}
    assert not [t for t in got.values() if t["scenario"] == "drain" and "e2e" in t["target"]]   # a figure only

    only_idle = evaluate_targets({"idle-1g": res["idle-1g"]})
    assert {t["status"] for t in only_idle if t["scenario"] != "idle-1g"} == {"NOT RUN"}


def test_issue_12_targets_on_synthetic_scale_and_idle():
    cfg = BenchConfig()
    res = {"scale": aggregate(SCENARIOS["scale"], cfg, [
               _run(r2=0.995, slope_vs_e2e=1.1, src_rss_noguest_bytes=60 * MiB, dst_rss_noguest_bytes=70 * MiB,
                    verified=True),
               _run(r2=0.985, slope_vs_e2e=1.3, src_rss_noguest_bytes=60 * MiB, dst_rss_noguest_bytes=70 * MiB,
                    verified=True),
               _run(r2=0.992, slope_vs_e2e=1.15, src_rss_noguest_bytes=60 * MiB, dst_rss_noguest_bytes=70 * MiB,
                    verified=True)]),
           "idle-1g": aggregate(SCENARIOS["idle-1g"], cfg, [_run(total_vs_e2e=1.25, ratio_to_tcp=1.02,
                                                                verified=True)])}
    got = {(t["scenario"], t["target"].split(" ")[0]): (t["status"], t["measured"]) for t in evaluate_targets(res)}
    assert got[("scale", "R²")] == ("PASS", 0.992)
    assert got[("scale", "slope")] == ("PASS", 1.15)
    assert got[("idle-1g", "total")] == ("MISS", 1.25)
    assert got[("idle-1g", "one")] == ("PASS", 1.02) and got[("idle-1g", "with")] == ("PASS", 1.02)


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
    assert "1.15 [1.10-1.30]" in text and "0.50 [0.40-0.60]" in text     # total/e2e, ratio TCP2
    assert "migration.streams: their default" in text
    md = format_markdown(doc)
    assert "| idle-1g |" in md and "## Targets" in md and "1.15 [1.10-1.30]" in md


def test_streams_option_reaches_both_agents_config():
    assert bench.config_from_args(bench.build_parser().parse_args([])).streams is None
    assert bench.config_from_args(bench.build_parser().parse_args(["--streams", "auto"])).streams == 0
    assert bench.config_from_args(bench.build_parser().parse_args(["--streams", "3"])).streams == 3
    for bad in ("-1", "two"):
        with pytest.raises(ValueError):
            bench.parse_streams(bad)
    for streams, want in ((None, None), (0, "migration.streams=0"), (2, "migration.streams=2")):
        cl = bench.Cluster("livemig-unused", lambda m: None, "insecure", "incremental", streams)
        try:
            for ag in (cl.a, cl.b):
                sets = [ag.extra_args[i + 1] for i, a in enumerate(ag.extra_args) if a == "--set"]
                assert [s for s in sets if s.startswith("migration.streams")] == ([want] if want else [])
                assert "migration.verify=incremental" in sets
        finally:
            shutil.rmtree(cl.workdir, ignore_errors=True)


def test_usage_errors_exit_2(capsys):
    assert bench.main(["--only", "no-such-scenario"]) == 2
    assert bench.main(["--runs", "0", "--only", "idle-1g"]) == 2
    assert bench.main(["--streams", "many", "--only", "idle-1g"]) == 2
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
    # ... and against the end-to-end raw runs (fresh destination, 1 and 2 connections) taken with it
    assert m["paired_e2e_ms"] > 0 and m["paired_e2e_gibps"] > 0 and m["paired_tcp2_gibps"] > 0
    assert math.isclose(m["total_vs_e2e"], m["total_ms"] / m["paired_e2e_ms"], rel_tol=1e-3)
    assert math.isclose(m["ratio_to_tcp2"], m["throughput_gibps"] / m["paired_tcp2_gibps"], rel_tol=1e-3)
    assert "streams" in m                                    # the report's field, or null
    paired = run["info"]["paired_raw"]
    assert list(paired) == ["tcp", "e2e", "e2e_2conn"] and all(p["verified"] for p in paired.values())
    for k in ("total_vs_e2e", "paired_e2e_ms", "ratio_to_tcp2"):
        assert set(idle[k]) == {"median", "min", "max", "n"}, k
    assert "streams" in idle and doc["streams"] is None
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
