"""Parallel data streams (issue 12): real agents, real sockets, real guests.

- A hotset guest migrates over 4 streams (mutual TLS, the default) and over
  the smaller number when the two agents offer different counts; verified,
  the guest's counter continues on the destination.
- Forced reordering: the destination's stream 1 reads nothing until stream 0
  received a page of round 2 (LIVEMIG_TEST_STREAM_HOLD), so round 1's copies
  on stream 1 are still in flight while round 2 lands on stream 0 and
  re-sends pages of stream 1's chunks behind them. The migration
  ends verified (the destination's memory equals the frozen source, so no
  stale copy won) and the hold demonstrably happened.
- Killing one data stream's connection (a TCP reset, from a proxy that
  carries every connection of the migration) fails the migration cleanly:
  the VM runs on the source only, nothing is left on the destination.
- ... and in the pause: the source held at the entry of stop-and-copy, the
  proxy armed, the hold released; the first frame of the last round kills
  its stream. The guest was paused: it must run again on the source.
- A Join with a wrong token, or for no migration, is refused without
  disturbing anything.
"""
from __future__ import annotations

import json
import os
import socket

import pytest

from protocol import DATA_STREAM_MAGIC, Join, MigrationSession, Role, encode_frame
from tests.conftest import wait_for
from tests.tools.checks import assert_keeps_writing, eventually, held_files, settled, writes
from tests.tools.proxy import FlipProxy

pytestmark = pytest.mark.timeout(120)

VM = "vm1"
HOT = "hotset:ws=8M,rate=20000"


def migrate(agents, a, to: str, *extra: str) -> tuple[int, dict]:
    r = agents.cli(a, "migrate", VM, "--to", to, "--wait", "--json", *extra, timeout_s=90)
    try:
        return r.returncode, json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"no JSON report (rc {r.returncode}): {r.stdout!r} {r.stderr!r}")


def start_vm(a, memory: str = "64M", workload: str = HOT) -> int:
    a.call("vm.create", name=VM, memory=memory, workload=workload, prefill="random")
    return wait_for(lambda: writes(a, VM) > 2000 and writes(a, VM), 20, what="guest writes on A")


def test_four_streams_tls_hotset_verified(agents, shm_prefix):
    a = agents("A", "--set", "migration.streams=4")
    b = agents("B", "--set", "migration.streams=4")
    w0 = start_vm(a)
    rc, report = migrate(agents, a, b.addr)
    assert rc == 0, (report, a.log_tail(), b.log_tail())
    assert report["status"] == "completed" and report["verified"] is True, report
    assert report["streams"] == 4
    assert report["pages_sent"] + report["zero_pages"] >= 16384        # every page of round 1
    inbound = b.call("jobs")[0]
    assert inbound["streams"] == 4 and inbound["state"] == "completed"
    ag, info = settled([a, b], VM, shm_prefix, min_writes=w0, hosts="B")
    assert_keeps_writing(b, VM, info["writes"])
    b.call("vm.delete", name=VM)


def test_streams_are_the_smaller_offer(plain_agents, shm_prefix):
    a = plain_agents("A", "--set", "migration.streams=3")
    b = plain_agents("B", "--set", "migration.streams=2")
    w0 = start_vm(a)
    rc, report = migrate(plain_agents, a, b.addr)
    assert rc == 0 and report["verified"] is True, report
    assert report["streams"] == 2 and b.call("jobs")[0]["streams"] == 2
    settled([a, b], VM, shm_prefix, min_writes=w0, hosts="B")
    b.call("vm.delete", name=VM)


def test_newer_copy_wins_while_an_older_one_is_in_flight_on_a_held_stream(plain_agents, shm_prefix):
    # 8 MiB = two 4 MiB chunks, one per stream: stream 1's part of round 1
    # (one 4 MiB batch) fits its send queue while its reader is held, and
    # round 2 sends chunk 0 (stream 0) first. The cap and the 1 ms target make
    # the source iterate: the guest dirties its hot set (all 8 MiB: both
    # streams' chunks) much faster than 1 ms of a 40 MiB/s link carries.
    a = plain_agents("A", "--set", "migration.streams=2")
    b = plain_agents("B", "--set", "migration.streams=2", env={"LIVEMIG_TEST_STREAM_HOLD": "1:2"})
    w0 = start_vm(a, memory="8M")
    rc, report = migrate(plain_agents, a, b.addr, "--downtime-ms", "1", "--max-bandwidth", "40")
    assert rc == 0, (report, a.log_tail(), b.log_tail())
    assert report["status"] == "completed" and report["verified"] is True, report
    rounds = report["rounds"]
    assert len(rounds) >= 3 and rounds[1]["pages_sent"] > 0, rounds          # round 2 re-sent pages
    log = b.log_tail(400)
    assert "data_stream_held" in log and "data_stream_hold_released" in log, log[-3000:]
    released = [json.loads(line) for line in log.splitlines() if "data_stream_hold_released" in line][0]
    assert released["seen"][0] >= 2 and released["seen"][1] == 0, released     # stream 1 had read nothing
    ag, info = settled([a, b], VM, shm_prefix, min_writes=w0, hosts="B")
    assert_keeps_writing(b, VM, info["writes"])
    b.call("vm.delete", name=VM)


@pytest.mark.parametrize("insecure", [True, False], ids=["plain", "tls"])
def test_killing_one_data_stream_fails_cleanly_on_the_source(agents, shm_prefix, insecure):
    cfg = ("--set", "migration.streams=2", "--set", "migration.io_timeout_s=5")
    a = agents("A", *cfg, insecure=insecure)
    b = agents("B", *cfg, insecure=insecure)
    w0 = start_vm(a)
    host, port = b.addr.rsplit(":", 1)
    with FlipProxy((host, int(port)), reset_data_stream_after=4 * 2**20) as proxy:
        rc, report = migrate(agents, a, proxy.addr, "--max-bandwidth", "64")
        assert proxy.data_streams == 2 and proxy.reset is not None
    assert rc != 0 and report["status"] == "failed", report
    assert report["verified"] is False
    assert "stream" in (report["error"] or "") or "lost" in (report["error"] or ""), report["error"]
    ag, info = eventually(lambda: settled([a, b], VM, shm_prefix, min_writes=w0, hosts="A"), 30,
                          what="VM back on A only, nothing on B")
    assert_keeps_writing(a, VM, info["writes"])
    assert b.call("vm.list") == []
    assert b.call("jobs")[0]["state"] == "failed"
    a.call("vm.delete", name=VM)


def test_a_data_stream_killed_in_the_pause_resumes_the_vm_on_the_source(plain_agents, shm_prefix):
    cfg = ("--set", "migration.streams=2", "--set", "migration.io_timeout_s=5")
    a = plain_agents("A", *cfg, env={"LIVEMIG_TEST_HOLD": "source:stop-and-copy"})
    b = plain_agents("B", *cfg)
    w0 = start_vm(a)
    host, port = b.addr.rsplit(":", 1)
    with FlipProxy((host, int(port))) as proxy:
        job = a.call("migrate", vm=VM, to=proxy.addr)
        held = wait_for(lambda: held_files(a), 60, what="source held at stop-and-copy")
        assert proxy.data_streams == 2 and proxy.reset is None
        proxy.reset_data_stream_after = 0            # the next frame on a data stream: reset
        os.unlink(held[0])
        report = a.call("job.wait", id=job["id"], timeout_s=60)
        assert proxy.reset is not None
    assert report["status"] == "failed" and report["verified"] is False, report
    assert "stop-and-copy" in report["phases"]
    assert "stream" in (report["error"] or "") or "lost" in (report["error"] or ""), report["error"]
    ag, info = eventually(lambda: settled([a, b], VM, shm_prefix, min_writes=w0, hosts="A"), 30,
                          what="VM running again on A only, nothing on B")
    assert_keeps_writing(a, VM, info["writes"])
    assert b.call("vm.list") == []
    a.call("vm.delete", name=VM)


def test_a_round_longer_than_the_io_timeout_is_not_a_lost_peer(plain_agents, shm_prefix):
    """Pages travel on the data streams, nothing on the control connection
    during a round: the destination's wait counts the streams' progress."""
    cfg = ("--set", "migration.io_timeout_s=1.5")
    a, b = plain_agents("A", *cfg), plain_agents("B", *cfg)
    w0 = start_vm(a, memory="32M")
    rc, report = migrate(plain_agents, a, b.addr, "--max-bandwidth", "8")     # round 1 alone: ~4 s
    assert rc == 0 and report["verified"] is True, (report, b.log_tail())
    assert report["rounds"][0]["ms"] > 2 * 1500, report["rounds"][0]              # really longer than the timeout
    settled([a, b], VM, shm_prefix, min_writes=w0, hosts="B")
    b.call("vm.delete", name=VM)


def test_a_join_with_a_wrong_token_is_refused(plain_agents, shm_prefix):
    b = plain_agents("B")
    host, port = b.addr.rsplit(":", 1)
    for mid in ("no-such-migration",):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(DATA_STREAM_MAGIC + MigrationSession(Role.SOURCE).send(
                Join(migration_id=mid, stream=0, token=bytes(16))))
            s.settimeout(10)
            assert s.recv(100) == b""            # closed, nothing answered
    wait_for(lambda: "no migration here waits for it" in b.log_tail(50), 10, what="refusal logged")
    # The endpoint still serves migrations.
    a = plain_agents("A")
    w0 = start_vm(a)
    rc, report = migrate(plain_agents, a, b.addr)
    assert rc == 0 and report["verified"] is True, report
    settled([a, b], VM, shm_prefix, min_writes=w0, hosts="B")
    b.call("vm.delete", name=VM)
