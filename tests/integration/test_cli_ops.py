"""The operator's CLI against real agents: progress on a terminal, Ctrl-C, dry run and fail-fast,
job set, cancel by VM name, history across a restart, and the error form of each refusal."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(120)

MIB = 2**20


def _env(ag) -> dict:
    return dict(os.environ, LIVEMIG_AGENT=ag.control)


def _spawn(ag, *args: str) -> subprocess.Popen:
    """The CLI in the background, stdout/stderr on pipes."""
    return subprocess.Popen([sys.executable, "-m", "agent", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=_env(ag))


def _on_a_terminal(ag, *args: str, until=None, timeout_s: float = 60.0) -> tuple[int, str]:
    """The CLI with stdin/stdout/stderr on a pseudo-terminal; everything it wrote, and its exit code.
    ``until(output_so_far, send)`` is called as output arrives (``send(bytes)`` types on the terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))     # 250 columns: no line cut
    proc = subprocess.Popen([sys.executable, "-m", "agent", *args], stdin=slave, stdout=slave, stderr=slave,
                            env=_env(ag), close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:              # EIO: the other side closed (the CLI exited)
                    break
                if not chunk:
                    break
                out += chunk
                if until is not None:
                    until(out.decode(errors="replace"), lambda data: os.write(master, data))
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)


def _one_line(r) -> str:
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1 and r.stdout == "", (r.stdout, r.stderr)
    return r.stderr


def _json_error(r) -> dict:
    assert r.returncode != 0 and r.stderr == "", r.stderr
    doc = json.loads(r.stdout)
    assert doc["code"] == r.returncode and doc["error"]
    return doc


def _job_of(ag, vm: str, state: str | None = None) -> dict | None:
    return next((j for j in ag.call("jobs", running=True) if j["vm"] == vm and (state is None or j["state"] == state)),
                None)


def _big_vm(ag, name: str, memory: str = "64M") -> None:
    """A VM whose every page is written (random prefill): round 1 sends all of it."""
    ag.call("vm.create", name=name, memory=memory, workload="uniform:rate=500", prefill="random", timeout_s=120)


def test_dry_run_asks_the_destination_and_creates_nothing(agents):
    a = agents("A")
    small = agents("B", "--set", "limits.max_guest_memory_mib=8")
    ok = agents("C")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=500")
    r = agents.cli(a, "migrate", "vm1", "--to", small.addr, "--dry-run")
    assert r.returncode == 1
    line = _one_line(r)
    assert "agent B" in line and "refuses vm1" in line and "memory" in line, line
    doc = _json_error(agents.cli(a, "migrate", "vm1", "--to", small.addr, "--dry-run", "--json"))
    assert doc["ok"] is False and doc["agent"] == "B" and doc["reject_code"] == 9      # NO_MEMORY
    r = agents.cli(a, "migrate", "vm1", "--to", ok.addr, "--dry-run")
    assert r.returncode == 0 and "agent C" in r.stdout and "would accept vm1" in r.stdout, r.stdout + r.stderr
    r = agents.cli(a, "migrate", "vm1", "--to", ok.addr, "--dry-run", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    for ag in (a, small, ok):                 # nothing was created anywhere: no job, no VM, no segment
        assert ag.call("jobs") == []
    assert small.call("vm.list") == [] and ok.call("vm.list") == []
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"{agents.prefix}.C.")]
    # migrate without --wait: the same check first, a refusal is an error now (no job is queued)
    r = agents.cli(a, "migrate", "vm1", "--to", small.addr)
    assert r.returncode == 1 and "refuses vm1" in _one_line(r)
    doc = _json_error(agents.cli(a, "migrate", "vm1", "--to", "127.0.0.1:1", "--json"))
    assert "cannot migrate vm1" in doc["error"] and "127.0.0.1:1" in doc["error"]
    assert a.call("jobs") == [] and a.call("vm.show", name="vm1")["state"] == "running"
    r = agents.cli(a, "migrate", "nosuch", "--to", ok.addr, "--dry-run")
    assert r.returncode == 1 and "no VM named" in _one_line(r)
    r = agents.cli(a, "migrate", "vm1", "--to", ok.addr)        # accepted: it queues and answers the job id
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    wait_for(lambda: any(j["id"] == job_id and j["state"] == "completed" for j in a.call("jobs")), 60,
             what="the migration completed")
    assert ok.call("vm.show", name="vm1")["state"] == "running"
    ok.call("vm.delete", name="vm1")


def test_progress_on_a_terminal_and_not_on_a_pipe(agents):
    a, b = agents("A"), agents("B")
    _big_vm(a, "vm1", "24M")
    rc, out = _on_a_terminal(a, "migrate", "vm1", "--to", b.addr, "--wait", "--max-bandwidth", "8")
    assert rc == 0, out
    progress = [line for line in out.replace("\r", "\n").split("\n") if "vm1 -> " in line and "round" in line]
    assert progress, out
    assert any("precopy" in p and "MiB/s" in p and "sent" in p and "left" in p and "ETA" in p for p in progress), progress
    assert "\x1b[K" in out                                       # drawn in place
    assert "state         completed" in out and "verified      yes" in out
    # the same on pipes: the report only, nothing on stderr
    r = agents.cli(b, "migrate", "vm1", "--to", a.addr, "--wait")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and "\x1b" not in r.stdout and "ETA" not in r.stdout
    assert r.stdout.startswith("migration ") and "state         completed" in r.stdout
    a.call("vm.delete", name="vm1")


def test_ctrl_c_cancels_the_migration_and_the_vm_stays(agents):
    a, b = agents("A"), agents("B")
    _big_vm(a, "vm1")
    p = _spawn(a, "migrate", "vm1", "--to", b.addr, "--wait", "--max-bandwidth", "4")     # 16 s at 4 MiB/s
    try:
        wait_for(lambda: _job_of(a, "vm1", "precopy"), 30, what="the migration in precopy")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 1, (out, err)
    assert "Traceback" not in err and "Ctrl-C: cancelling" in err and "(vm1)" in err, err
    assert "cancelled: vm1 runs here" in err
    assert "state         cancelled" in out
    assert a.call("vm.show", name="vm1")["state"] == "running"
    # B discards its shell on the Abort, on its own time (joining its data streams' threads first).
    wait_for(lambda: b.call("vm.list") == [], 10, what="B discarded the shell")
    a.call("vm.delete", name="vm1")


def test_job_set_raises_the_bandwidth_of_a_running_migration(agents):
    a, b = agents("A"), agents("B")
    _big_vm(a, "vm1")
    a.call("vm.create", name="vm2", memory="16M", workload="uniform:rate=500")
    assert agents.cli(a, "config", "set", "max-live-migrations", "1").returncode == 0
    t0 = time.monotonic()
    p = _spawn(a, "migrate", "vm1", "--to", b.addr, "--wait", "--max-bandwidth", "4")     # 16 s at 4 MiB/s
    try:
        job = wait_for(lambda: _job_of(a, "vm1", "precopy"), 30, what="vm1 in precopy")
        # a job not started yet (vm2 waits for the one slot) is refused, and cancelled by its VM's name
        r = agents.cli(a, "migrate", "vm2", "--to", b.addr)
        assert r.returncode == 0, r.stderr
        queued = wait_for(lambda: _job_of(a, "vm2", "queued"), 10, what="vm2 queued")
        r = agents.cli(a, "job", "set", queued["id"], "--max-bandwidth", "100")
        assert r.returncode == 1 and "has not started yet" in _one_line(r)
        r = agents.cli(a, "cancel", "vm2")
        assert r.returncode == 0 and f"{queued['id']} (vm2): cancelled" in r.stdout, r.stdout + r.stderr
        # the destination's side of vm1's job is inbound: tune it on its source
        wait_for(lambda: _job_of(b, "vm1"), 10, what="the inbound job on B")
        doc = _json_error(agents.cli(b, "job", "set", job["id"], "--max-bandwidth", "100", "--json"))
        assert "inbound" in doc["error"]
        r = agents.cli(a, "job", "set", job["id"], "--max-bandwidth", "0", "--downtime-ms", "500")
        assert r.returncode == 0, r.stderr
        assert "bandwidth unlimited, downtime target 500 ms" in r.stdout
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, (out, err)
    assert elapsed < 12, f"finished in {elapsed:.1f} s: the raised bandwidth was not used (16 s at 4 MiB/s)"
    r = agents.cli(a, "job", "set", job["id"], "--max-bandwidth", "10")
    assert r.returncode == 1 and "already ended (completed)" in _one_line(r)
    for args in (("job", "set", "nojob", "--downtime-ms", "5"), ("cancel", "nosuch")):
        r = agents.cli(a, *args)
        assert r.returncode == 1 and "no job" in _one_line(r), args
    for args in (("job", "set", job["id"]), ("job", "set"), ("job", job["id"], "--max-bandwidth", "3")):
        r = agents.cli(a, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert _json_error(agents.cli(a, *args, "--json"))["code"] == 2
    b.call("vm.delete", name="vm1")
    a.call("vm.delete", name="vm2")


def test_history_survives_a_restart_and_filters(agents):
    a, b = agents("A"), agents("B")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=500")
    a.call("vm.create", name="vm2", memory="16M", workload="uniform:rate=500")
    assert agents.cli(a, "migrate", "vm1", "--to", b.addr, "--wait").returncode == 0
    r = agents.cli(a, "migrate", "vm2", "--to", "127.0.0.1:1", "--wait")     # --wait: no precheck, a failed job
    assert r.returncode == 1 and "state         failed" in r.stdout
    agents.restart(a)
    rows = json.loads(agents.cli(a, "jobs", "--json").stdout)
    assert {(j["vm"], j["state"]) for j in rows} == {("vm1", "completed"), ("vm2", "failed")}
    assert all(j["finished_at_iso"].startswith(time.strftime("%Y")) for j in rows)
    failed = json.loads(agents.cli(a, "jobs", "--state", "failed", "--json").stdout)
    assert [j["vm"] for j in failed] == ["vm2"]
    assert [j["vm"] for j in json.loads(agents.cli(a, "jobs", "--vm", "vm1", "--since", "1h", "--json").stdout)] \
        == ["vm1"]
    assert json.loads(agents.cli(a, "jobs", "--since", "2999-01-01T00:00:00", "--json").stdout) == []
    human = agents.cli(a, "jobs").stdout
    assert "completed" in human and "failed" in human and "None" not in human and "False" not in human
    r = agents.cli(a, "job", failed[0]["id"], "--json")              # a finished job's report, from the history
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "failed"
    r = agents.cli(a, "jobs", "--since", "yesterday")
    assert r.returncode == 2 and "--since" in r.stderr and "Traceback" not in r.stderr
    # the VM's last migration, on the host it went to
    doc = json.loads(agents.cli(b, "vm", "show", "vm1", "--json").stdout)["last_migration"]
    assert doc["state"] == "completed" and doc["verified"] is True and doc["destination"] == "B"
    assert doc["source"] == "A" and doc["direction"] == "inbound" and doc["downtime_ms"] > 0
    human = agents.cli(b, "vm", "show", "vm1").stdout
    line = next(ln for ln in human.splitlines() if ln.startswith("last_migration"))
    assert "completed" in line and "A -> B" in line and "verified yes" in line and "ago" in line, line
    assert "memory_bytes     16.0 MiB" in human and "None" not in human
    b.call("vm.delete", name="vm1")
    a.call("vm.delete", name="vm2")


def test_top_shows_jobs_and_vms_and_quits(agents):
    a = agents("A")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=500")
    r = agents.cli(a, "top", "--json", "--count", "2", "--interval", "0.1")
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 0 and len(docs) == 2, r.stdout + r.stderr
    assert docs[0]["agent"] == "A" and docs[0]["active"] == [] and docs[0]["vms"][0]["name"] == "vm1"
    assert "refreshed_at_iso" in docs[0]
    sent = []

    def quit_when_drawn(out: str, send) -> None:
        if "VMS" in out and not sent:
            sent.append(send(b"q"))

    # q on a terminal quits; the first frame shows the (empty) migrations and the VM with its write rate
    rc, out = _on_a_terminal(a, "top", "--interval", "0.2", until=quit_when_drawn, timeout_s=30)
    assert rc == 0, out
    assert sent and "MIGRATIONS  none under way" in out and "vm1" in out and "WRITES/S" in out
    # Ctrl-C quits too (exit 0, no traceback)
    p = _spawn(a, "top", "--interval", "0.2")
    try:
        p.stdout.readline()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0 and "Traceback" not in err
    a.call("vm.delete", name="vm1")


def test_status_config_bench_and_completion(agents):
    import importlib.metadata

    a = agents("A")
    assert json.loads(agents.cli(a, "status", "--json").stdout)["version"] == importlib.metadata.version("livemig")
    human = agents.cli(a, "status").stdout
    assert "version" in human and "None" not in human and "False" not in human
    doc = json.loads(agents.cli(a, "config", "get", "--json").stdout)
    assert doc["settings"]["max-live-migrations"]["value"] == 2 and doc["config"]["agent"]["name"] == "A"
    assert agents.cli(a, "config", "set", "max-live-migrations", "5").returncode == 0
    r = agents.cli(a, "config", "get", "max-live-migrations")
    assert r.returncode == 0 and r.stdout.strip() == "max-live-migrations = 5"
    r = agents.cli(a, "config", "get", "migration.downtime_target_ms")
    assert r.returncode == 0 and r.stdout.strip() == "migration.downtime_target_ms = 300"
    r = agents.cli(a, "config", "set", "bogus", "1")
    assert r.returncode == 1 and "max-live-migrations, max-storage-migrations" in _one_line(r)
    assert "bogus" in _json_error(agents.cli(a, "config", "get", "bogus", "--json"))["error"]
    r = agents.cli(a, "config", "set", "--help")
    assert r.returncode == 0 and "max-storage-migrations" in r.stdout
    r = agents.cli(a, "bench", "--help")             # the bench's own options, not livemig's
    assert r.returncode == 0 and "--quick" in r.stdout and "--tcp-runs" in r.stdout, r.stdout
    script = agents.cli(a, "completion", "bash").stdout
    check = subprocess.run(["bash", "-c", script + '\nCOMP_WORDS=(livemig job); COMP_CWORD=1; _livemig; '
                            'echo "${COMPREPLY[*]}"; COMP_WORDS=(livemig jobs --s); COMP_CWORD=2; _livemig; '
                            'echo "${COMPREPLY[*]}"'], capture_output=True, text=True, timeout=10)
    first, second = check.stdout.splitlines()
    assert sorted(first.split()) == ["job", "jobs"] and sorted(second.split()) == ["--since", "--state"], check.stdout + check.stderr
