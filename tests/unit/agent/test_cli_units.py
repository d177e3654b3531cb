"""The CLI's vocabulary, hosts file, history ring, completion words and the wait loop, in process."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from agent.cli.cluster import Cluster
from agent.cli.completion import command_words
from agent.cli.exits import CliError
from agent.cli.output import job_fraction
from agent.cli.parser import build_parser
from agent.cli.progress import Detached, ProgressDisplay, progress_line, wait_jobs
from agent.cli.units import fmt_duration, human, parse_since, with_iso
from agent.control.history import HISTORY_FILE, JobHistory, matches
from agent.migration.jobs import Job, JobTable
from agent.migration.phases import MigrationPhase as P

pytestmark = pytest.mark.timeout(30)


def test_human_values_never_show_python_or_raw_units():
    assert human("memory_bytes", 16 * 2**20) == "16.0 MiB"
    assert human("bandwidth_bps", 8 * 2**20) == "8.0 MiB/s"
    assert human("max_bandwidth_mibps", 0) == "unlimited"
    assert human("x", None) == "-" and human("x", True) == "yes" and human("x", False) == "no"
    assert human("uptime_s", 3700) == "1 h 1 min" and human("total_ms", 12.345) == "12.3 ms"
    assert human("control_mode", 0o600) == "0600"
    t = time.time() - 90
    assert human("finished_at", t, short=True) == "1 min 30 s ago"
    assert human("finished_at", t).endswith("(1 min 30 s ago)") and "T" in human("finished_at", t)
    assert human("security", {"mode": "tls", "ok": False}) == "mode tls, ok no"
    assert fmt_duration(0.25) == "250 ms"


def test_json_timestamps_get_an_iso_twin_next_to_the_unix_value():
    doc = with_iso([{"finished_at": 0.0, "started_at": None, "rounds": [{"sent_at": 86400}]}])
    assert doc[0]["finished_at"] == 0.0 and doc[0]["finished_at_iso"].startswith("19")
    assert "started_at_iso" not in doc[0] and "sent_at_iso" in doc[0]["rounds"][0]
    assert list(doc[0]).index("finished_at_iso") == list(doc[0]).index("finished_at") + 1


def test_since_takes_a_duration_or_an_iso_time():
    assert parse_since("1h", now=10_000.0) == 6400.0 and parse_since("90s", now=100.0) == 10.0
    assert parse_since("2d", now=200_000.0) == 200_000.0 - 2 * 86400
    assert parse_since("1970-01-02T00:00:00Z") == 86400.0
    with pytest.raises(ValueError, match="duration"):
        parse_since("yesterday")


def test_hosts_file_names_hosts_and_adds_the_default_port(tmp_path):
    c = Cluster.parse("h.toml", {"default_port": 7800, "hosts": {"a": {"control": "~/a.sock", "address": "10.0.0.1"},
                                                                  "b": {"address": "[fd00::2]:7700"}}})
    assert c.target("a") == "10.0.0.1:7800" and c.target("b") == "[fd00::2]:7700"
    assert c.target("10.0.0.9") == "10.0.0.9:7800" and c.target("10.0.0.9:1") == "10.0.0.9:1"
    assert c.agent("a") == os.path.expanduser("~/a.sock") and c.agent("/x.sock") == "/x.sock"
    with pytest.raises(CliError, match="hosts.b has no control"):
        c.agent("b")
    for doc, key in (({"hosts": {"x": {"control": 5}}}, "hosts.x.control"),
                     ({"hosts": {"x": {"adress": "h"}}}, "hosts.x.adress"),
                     ({"default_port": 0}, "default_port"), ({"host": {}}, "host")):
        with pytest.raises(CliError, match=key.replace(".", r"\.")):
            Cluster.parse("h.toml", doc)
    bad = tmp_path / "bad.toml"
    bad.write_text("[hosts\n")
    with pytest.raises(CliError, match="not valid TOML"):
        Cluster.load(str(bad))


def _finished_job(table: JobTable, vm: str) -> Job:
    job = table.add(Job(vm=vm, source="A", destination="B", direction="outbound"))
    job.tracker.set_phase(expected=P.QUEUED, new=P.CANCELLING)
    job.tracker.set_phase(expected=P.CANCELLING, new=P.CANCELLED)
    job.finish()
    return job


def test_history_is_a_bounded_ring_that_survives_a_reload_and_a_torn_line(tmp_path):
    table = JobTable()
    table.observers.append(JobHistory(str(tmp_path), limit=3))
    jobs = [_finished_job(table, f"vm{i}") for i in range(7)]
    path = tmp_path / HISTORY_FILE
    lines = path.read_text().splitlines()
    assert len(lines) < 6                             # compacted at 2 x limit, never more
    with path.open("a") as f:
        f.write('{"id": "torn", "vm"')                # a crash in the middle of an append
    again = JobHistory(str(tmp_path), limit=3)
    assert [r["id"] for r in again.records()] == [j.id for j in jobs[-3:]]
    assert again.records()[-1]["state"] == "cancelled" and again.records()[-1]["status"] == "cancelled"
    assert again.get(jobs[-1].id)["vm"] == "vm6" and again.get(jobs[0].id) is None
    last = again.last_migration("vm6")
    assert last["state"] == "cancelled" and last["source"] == "A" and last["destination"] == "B"
    assert again.last_migration("vm0") is None
    assert not (tmp_path / f"{HISTORY_FILE}.tmp").exists()
    rec = again.records()[-1]
    assert matches(rec, "vm6", "cancelled", rec["finished_at"]) and not matches(rec, "vm5", None, None)
    assert not matches(rec, None, "completed", None) and not matches(rec, None, None, rec["finished_at"] + 1)
    assert all(json.loads(line)["id"] for line in path.read_text().splitlines()[:-1])


def test_completion_words_come_from_the_parser():
    words = command_words(build_parser())
    assert {"vm", "migrate", "jobs", "top", "completion"} <= set(words["livemig"])
    assert {"--dry-run", "--to", "--wait", "--max-bandwidth"} <= set(words["livemig migrate"])
    assert {"create", "list", "show"} <= set(words["livemig vm"]) and "--all" in words["livemig vm list"]


def test_progress_line_and_fraction_from_the_figures():
    j = {"id": "j1", "vm": "vm1", "direction": "outbound", "destination": "B:1", "state": "precopy", "round": 2,
         "pages_sent": 256, "pages_total": 1024, "remaining_bytes": 3 * 2**20, "bandwidth_bps": 4 * 2**20,
         "dirty_rate_pps": 256, "expected_downtime_ms": 750.0, "eta_s": 0.75, "progress_pct": 99.9}
    assert job_fraction(j) == 0.25                    # 1 MiB sent, 3 MiB left: not the job's 99.9
    line = progress_line(j)
    for part in ("vm1 -> B:1", "precopy", "round 2", "1.0 MiB sent, 3.0 MiB left", "4.0 MiB/s", "dirty 1.0 MiB/s",
                 "downtime ~750.0 ms", "ETA 750 ms", " 25%"):
        assert part in line, (part, line)


class _Stream:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def test_display_redraws_in_place():
    s = _Stream()
    d = ProgressDisplay(s)
    d.draw(["one", "two"])
    d.draw(["three"])
    assert s.text == "\r\x1b[Kone\ntwo" + "\r\x1b[K\x1b[1A\x1b[Kthree"


def _interrupt_after(*events: threading.Event) -> threading.Thread:
    """SIGINT to this process (as Ctrl-C sends it) once each event is set, in turn."""
    def run() -> None:
        for e in events:
            if e.wait(10):
                signal.raise_signal(signal.SIGINT)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_ctrl_c_cancels_then_detaches(capsys):
    job = {"id": "j1", "vm": "vm1", "state": "precopy"}
    polled, cancelled, done = threading.Event(), [], threading.Event()

    def poll():
        polled.set()
        return [job]

    def cancel(j):
        cancelled.append(j["id"])
        done.set()

    # once: cancel is called, and the waited-on call's result (the cancelled report) is returned
    t = _interrupt_after(polled)
    r = wait_jobs(lambda: done.wait(10) and {"state": "cancelled"}, poll, cancel, show=False, poll_s=0.05)
    t.join(5)
    assert r == {"state": "cancelled"} and cancelled == ["j1"]
    assert "Ctrl-C: cancelling j1 (vm1)" in capsys.readouterr().err
    # twice: detached, the migration goes on
    never, asked = threading.Event(), threading.Event()
    polled.clear()
    t = _interrupt_after(polled, asked)
    with pytest.raises(Detached, match="detached: j1 \\(vm1\\) goes on") as exc:
        wait_jobs(lambda: never.wait(10), poll, lambda j: asked.set() or never.wait(10), show=False, poll_s=0.05)
    t.join(5)
    assert exc.value.code == 130
