"""The fault matrix: the VM runs on exactly one host, whatever fails (issue 8).

Two real agents, A (source) and B (destination), on fixed 127.0.0.1 ports
(a restarted agent keeps its address); a 32 MiB VM running
``hotset:ws=4M,rate=2000`` migrates A -> B. The test holds one side at the
*entry* of a phase (``LIVEMIG_TEST_HOLD``, agent/migration/testhooks.py),
injects the fault, releases the hold where the holder still lives, restarts
what was killed if it is an agent (without the hold), and then, polling
within a bound, requires the end state of ``tests.tools.checks.settled``:

- the VM is ``running`` on exactly one host and listed by no other
  (``vm list --json`` of the other host lists nothing);
- its write counter is at least the value read just before the fault (and
  the source's ``writes_at_pause`` when its job survived), and keeps growing;
- no job running on either side; the only segment with the test's prefix is
  the VM's own and the only guest process its guest; no ``held.*`` file;
- throttle_pct is 0;

and, all along (``RunMonitor``, sampling the control pages every ~5 ms), no
two running copies and no running copy behind a counter seen earlier.

Kill cells (``test_kill[<target>-<phase>]``, 28): SIGKILL of the target while
the side named below is held at the phase. A killed guest is restarted by
its agent's supervisor. ``A|B``: either host may end up with the VM (both
are correct; which one depends on where inside the phase the fault lands).

| target \\ phase    | negotiate | setup | precopy | stop-and-copy | verify | resume | commit | held side   |
|-------------------|-----------|-------|---------|---------------|--------|--------|--------|-------------|
| source-agent      | A         | A     | A       | A             | A      | A      | B      | source      |
| destination-agent | A         | A     | A       | A             | A      | A      | B      | destination |
| source-guest      | A         | A     | A       | A             | A|B    | A|B    | B      | source      |
| destination-guest | A|B *     | A|B * | A|B     | A|B           | A|B    | A|B    | B      | destination |

Why: until the destination has received Resume nothing runs there, so the
VM ends on A (verify comes before resume). At commit the destination has
resumed and owns the VM: it ends on B (a restarted source asks B by
migration id and releases its copy). The hold at the entry of resume comes
before the source sends Resume and, on the destination, after Resume
arrived but before ownership is durable (record ``running``, id taken): a
killed agent there leaves the VM on A (the source asks and hears
"discarded"/"unknown", or never sent Resume).
A guest killed before its VM's Resume either fails the migration (VM on A,
its guest restarted there) or is replaced from its segment (VM on B).
(*) The destination has no guest before setup launches its standby guest:
the hold is released and the guest killed as soon as it appears.

Stop cells (``test_stop[<agent>-<phase>]``, 6): SIGSTOP of the held agent,
its hold released while it is stopped, SIGCONT once its peer has given up
(its jobs ended) and longer than io_timeout_s has passed. The VM ends on A
in all six: nothing was resumed on B before the stop, and B's copy is
discarded when the peer gives up.

| stopped agent \\ phase | precopy | stop-and-copy | verify |
|-----------------------|---------|---------------|--------|
| source-agent          | A       | A             | A      |
| destination-agent     | A       | A             | A      |

Timeouts are short (io_timeout_s=2, switchover 1500 ms, guest heartbeat
1 s) so a cell takes a few seconds. The migrations use two data streams
(protocol v3): a killed or stopped agent takes both with it, so each cell
also checks that every sender and receiver thread is stopped and joined
before the memory it touches goes. A single data stream dying on its own
(a reset, in pre-copy and inside the pause) is in test_streams.py.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from agent.migration import testhooks
from agent.migration.phases import MigrationPhase
from tests.conftest import wait_for
from tests.tools.checks import (
    RunMonitor,
    assert_keeps_writing,
    call,
    eventually,
    free_addr,
    guest_pids,
    held_files,
    kill_guest,
    settled,
    writes,
)

pytestmark = pytest.mark.timeout(60)

VM = "vm1"
MEMORY = "32M"
WORKLOAD = "hotset:ws=4M,rate=2000"
IO_TIMEOUT_S = 2.0
CONFIG = (
    "--set", f"migration.io_timeout_s={IO_TIMEOUT_S}",
    "--set", "migration.handshake_timeout_s=2",
    "--set", "migration.guest_ack_timeout_s=2",
    "--set", "migration.resolve_timeout_s=15",     # longer than an agent restart: a query gets its answer
    "--set", "migration.switchover_timeout_ms=1500",
    "--set", "migration.guest_heartbeat_timeout_s=1",
    # Two data streams (auto gives one on a 2-core machine): every cell then
    # also fails, stops and joins more than one sender and receiver thread.
    "--set", "migration.streams=2",
)
HOLD_TIMEOUT_S = 20.0        # migration reaches the held phase
SETTLE_TIMEOUT_S = 20.0      # fault -> end state (io timeouts, restart, resolution by query)

PHASES = ("negotiate", "setup", "precopy", "stop-and-copy", "verify", "resume", "commit")
TARGETS = ("source-agent", "destination-agent", "source-guest", "destination-guest")
A, B, AB = "A", "B", "AB"
EXPECT = {   # (target, phase) -> hosts the VM may end on (the table in the docstring)
    **{(t, p): A for t in ("source-agent", "destination-agent") for p in PHASES[:6]},
    **{(t, "commit"): B for t in TARGETS},
    **{("source-guest", p): A for p in PHASES[:4]},
    ("source-guest", "verify"): AB, ("source-guest", "resume"): AB,
    **{("destination-guest", p): AB for p in PHASES[:6]},
}
assert set(EXPECT) == {(t, p) for t in TARGETS for p in PHASES}
KILL_CELLS = [pytest.param(t, p, id=f"{t}-{p}") for t in TARGETS for p in PHASES]
STOP_CELLS = [pytest.param(t, p, id=f"{t}-{p}") for t in ("source-agent", "destination-agent")
              for p in ("precopy", "stop-and-copy", "verify")]


# ---- the hold hook itself (no agents) ------------------------------------------
def test_hold_hook_holds_until_the_file_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(testhooks, "HOLDS", testhooks.parse_holds(" source:precopy, destination:commit ,"))
    d = str(tmp_path)

    async def scenario():
        # Not named: returns at once and touches nothing.
        await asyncio.wait_for(testhooks.hold(d, "source", "setup", "j1"), 1.0)
        await asyncio.wait_for(testhooks.hold(d, "destination", "precopy", "j1"), 1.0)
        assert os.listdir(d) == []
        # Named (as a MigrationPhase too): file with the job id, held until it is removed.
        task = asyncio.create_task(testhooks.hold(d, "source", MigrationPhase.PRECOPY, "job42"))
        path = tmp_path / "held.source.precopy"
        for _ in range(1000):
            if path.exists():
                break
            await asyncio.sleep(0.005)          # poll: the hook's file appears
        assert path.read_text() == "job42"
        assert sorted(os.listdir(d)) == ["held.source.precopy"]       # no temporary file left
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), 0.2)        # still held
        path.unlink()
        await asyncio.wait_for(task, 1.0)                            # released within a few polls
        # Cancelled while held (agent shutdown): the file goes too.
        task = asyncio.create_task(testhooks.hold(d, "destination", "commit", "job43"))
        for _ in range(1000):
            if (tmp_path / "held.destination.commit").exists():
                break
            await asyncio.sleep(0.005)          # poll: the hook's file appears
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert os.listdir(d) == []

    asyncio.run(scenario())


def test_hold_hook_reads_the_environment_once_at_import(tmp_path):
    code = ("import asyncio; from agent.migration import testhooks as t; print(sorted(t.HOLDS));"
            "asyncio.run(t.hold('/nonexistent/dir', 'source', 'precopy', 'j'))")
    env = dict(os.environ, LIVEMIG_TEST_HOLD="source:verify,destination:commit")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "['destination:commit', 'source:verify']", r.stderr
    env.pop("LIVEMIG_TEST_HOLD")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr     # unset: a no-op, no file written


# ---- the checks can fail (negative controls) -------------------------------------
def test_checks_catch_two_copies_and_none(agents, shm_prefix):
    a, b = agents("A"), agents("B")
    with RunMonitor(shm_prefix) as mon:
        a.call("vm.create", name=VM, memory="8M", workload="uniform:rate=500")
        b.call("vm.create", name=VM, memory="8M", workload="uniform:rate=500")     # a second copy
        wait_for(lambda: mon.violations, 10, what="the monitor sees two running copies")
    with pytest.raises(AssertionError, match="exactly one"):
        settled([a, b], VM, shm_prefix)
    b.call("vm.delete", name=VM)
    settled([a, b], VM, shm_prefix, min_writes=1)          # one copy: passes
    with pytest.raises(AssertionError, match="below|<"):
        settled([a, b], VM, shm_prefix, min_writes=10**12)
    with pytest.raises(AssertionError, match="expected on"):
        settled([a, b], VM, shm_prefix, hosts="B")
    a.call("vm.delete", name=VM)
    with pytest.raises(AssertionError, match="none"):
        settled([a, b], VM, shm_prefix)


# ---- the cells ----------------------------------------------------------------
def _start_pair(agents, side: str | None, phase: str | None):
    hold = {testhooks.ENV: f"{side}:{phase}"} if side else None
    a = agents("A", *CONFIG, listen=free_addr(), env=hold if side == "source" else None)
    b = agents("B", *CONFIG, listen=free_addr(), env=hold if side == "destination" else None)
    return a, b


def _restart_without_hold(ag) -> None:
    """SIGKILL (if still alive), remove the hold file the dead holder left, start again, hold-free."""
    ag.kill()
    for p in held_files(ag):
        os.unlink(p)
    if ag.env is not None:
        ag.env = {k: v for k, v in ag.env.items() if k != testhooks.ENV}
    ag.start()


def _release(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _begin(agents, side: str, phase: str):
    """Agents up, VM writing on A, migration A -> B held at (side, phase). Returns (a, b, held path, job id)."""
    a, b = _start_pair(agents, side, phase)
    a.call("vm.create", name=VM, memory=MEMORY, workload=WORKLOAD)
    wait_for(lambda: writes(a, VM) > 200, 20, what="guest writes on A")
    job = a.call("migrate", vm=VM, to=b.addr)
    holder = a if side == "source" else b
    path = testhooks.hold_path(holder.data_dir, side, phase)
    wait_for(lambda: os.path.exists(path) or not _job_running(a, job["id"]), HOLD_TIMEOUT_S,
             what=f"{side} held at {phase}")
    assert os.path.exists(path), (f"the migration never held at {side}:{phase} "
                                  f"(job {a.call('job.show', id=job['id'])})")
    with open(path) as f:
        assert f.read() == job["id"]          # both sides name the migration by the source's job id
    return a, b, path, job["id"]


def _job_running(ag, job_id: str) -> bool:
    return ag.call("job.show", id=job_id)["status"] == "running"


def _end_state(agents, a, b, prefix: str, w0: int, hosts: str, mon: RunMonitor, job_id: str) -> None:
    try:
        ag, info = eventually(lambda: settled([a, b], VM, prefix, min_writes=w0, hosts=hosts), SETTLE_TIMEOUT_S,
                              what=f"exactly one running copy (expected on {'/'.join(hosts)})")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; run monitor: {mon.violations[:3] or 'no violation'}") from None
    pause = _job(a, job_id)        # the source's job, unless A was restarted (then w0 is all we know)
    if pause is not None:
        at_pause = call(a, "job.show", id=job_id)["writes_at_pause"]
        assert info["writes"] >= at_pause, f"writes {info['writes']} < {at_pause} at the pause"
    assert_keeps_writing(ag, VM, info["writes"])
    other = b if ag is a else a
    r = agents.cli(other, "vm", "list", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == [], (other.name, r.stdout, r.stderr)
    settled([a, b], VM, prefix, min_writes=info["writes"], hosts=ag.name)   # and still so
    mon.stop()
    mon.check()
    if hosts == A:                  # the destination never got to run it, not even for a moment
        assert mon.ran_on("B") == set(), f"B ran the VM: {mon.ran_on('B')}"
    call(ag, "vm.delete", name=VM)


@pytest.mark.parametrize("target,phase", KILL_CELLS)
def test_kill(target, phase, agents, shm_prefix):
    side = "source" if target.startswith("source") else "destination"
    with RunMonitor(shm_prefix) as mon:
        a, b, path, job_id = _begin(agents, side, phase)
        w0 = writes(a, VM)                       # read just before the fault
        if target == "source-agent":
            _restart_without_hold(a)
        elif target == "destination-agent":
            _restart_without_hold(b)
        elif target == "source-guest":
            kill_guest(shm_prefix, "A", VM)
            _release(path)
        else:
            if guest_pids(shm_prefix, "B", VM):
                kill_guest(shm_prefix, "B", VM)
                _release(path)
            else:                                # no standby guest yet: kill it the moment it appears
                _release(path)
                kill_guest(shm_prefix, "B", VM)
        _end_state(agents, a, b, shm_prefix, w0, EXPECT[(target, phase)], mon, job_id)


@pytest.mark.parametrize("target,phase", STOP_CELLS)
def test_stop(target, phase, agents, shm_prefix):
    side = "source" if target.startswith("source") else "destination"
    with RunMonitor(shm_prefix) as mon:
        a, b, path, job_id = _begin(agents, side, phase)
        w0 = writes(a, VM)
        stopped, peer = (a, b) if side == "source" else (b, a)
        t0 = time.monotonic()
        stopped.proc.send_signal(signal.SIGSTOP)
        try:
            _release(path)                      # it goes on from the hold only once continued
            # The peer gives up (its side of the migration ends), and the stop outlasts io_timeout_s.
            wait_for(lambda: (peer_job := _job(peer, job_id)) is not None and peer_job["state"] in
                     ("completed", "failed", "cancelled") and time.monotonic() - t0 > IO_TIMEOUT_S + 0.2,
                     SETTLE_TIMEOUT_S, interval_s=0.05, what=f"{peer.name} gives up on the stopped {stopped.name}")
        finally:
            stopped.proc.send_signal(signal.SIGCONT)
        _end_state(agents, a, b, shm_prefix, w0, A, mon, job_id)


def _job(ag, job_id: str) -> dict | None:
    for j in call(ag, "jobs"):
        if j["id"] == job_id:
            return j
    return None
