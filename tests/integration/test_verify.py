"""Verification catches wrong memory before the destination guest runs (issue 8).

- A byte of destination RAM changed outside the receive path
  (``LIVEMIG_FAULT_INJECT=corrupt-unmarked``: the incremental digests are
  not told) is caught by ``migrate --verify full``: the migration fails and
  the VM runs on the source, never on the destination. Controls: the same
  fault with ``--verify incremental`` goes unseen (so the full hash is what
  catches it), and ``--verify full`` without the fault completes verified.
- A byte flipped on the wire (tests/tools/proxy.py, inside a PageBatch
  payload after the first 8 MiB, in a page outside the hot set so no later
  round resends it) is caught by the default (incremental) mode: failed,
  VM on the source, nothing left on the destination. Control: the same
  proxy relaying unchanged completes verified.
- ``migrate --wait`` exits 0 only for a migration that completed and was
  verified; a failed verification exits non-zero.

"Never ran on the destination" is watched, not inferred: a RunMonitor
samples every segment's control page during the migration, and the
destination's inbound job never entered ``resume``.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import wait_for
from tests.tools.checks import RunMonitor, assert_keeps_writing, call, eventually, segments, settled, writes
from tests.tools.proxy import FlipProxy

pytestmark = pytest.mark.timeout(90)

VM = "vm1"
CONFIG = ("--set", "migration.io_timeout_s=5", "--set", "migration.guest_heartbeat_timeout_s=2")


def migrate_cli(agents, a, to: str, *extra: str) -> tuple[int, dict]:
    r = agents.cli(a, "migrate", VM, "--to", to, "--wait", "--json", *extra, timeout_s=60)
    try:
        report = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"migrate printed no JSON report (rc {r.returncode}): {r.stdout!r} {r.stderr!r}")
    return r.returncode, report


WRITING = "hotset:ws=4M,rate=2000"


def create_vm(a, prefill: str = "none", workload: str = WRITING) -> None:
    a.call("vm.create", name=VM, memory="32M", workload=workload, prefill=prefill)
    if workload != "idle":
        wait_for(lambda: writes(a, VM) > 200, 20, what="guest writes on A")


def assert_failed_on_source(a, b, prefix: str, mon: RunMonitor, report: dict, w0: int) -> None:
    """The migration failed verification; the VM runs on A only and never ran on B; B kept nothing."""
    assert report["status"] == "failed" and report["verified"] is False, report
    assert "differ" in (report["error"] or ""), report["error"]
    ag, info = eventually(lambda: settled([a, b], VM, prefix, min_writes=w0, hosts="A"), 20,
                          what="VM back on A, nothing on B")
    if info["workload"] != "idle":
        assert_keeps_writing(a, VM, info["writes"])
    assert segments(prefix, "B") == set() and call(b, "vm.list") == []
    inbound = [j for j in call(b, "jobs") if j["id"] == report["id"]]
    assert inbound and inbound[0]["state"] == "failed", inbound
    assert "resume" not in call(b, "job.show", id=report["id"])["phases"]   # never reached resume
    mon.stop()
    mon.check()
    assert mon.ran_on("B") == set(), f"the destination ran the VM: {mon.ran_on('B')}"


# The VM for the corrupt-unmarked tests is idle with random contents: page 0 (the one the hook
# flips) is never written again, so no later round or re-hash can stumble on the flip; only a
# full hash at the pause sees it.
def test_verify_full_catches_ram_changed_outside_the_receive_path(agents, shm_prefix):
    a = agents("A", *CONFIG)
    b = agents("B", *CONFIG, env={"LIVEMIG_FAULT_INJECT": "corrupt-unmarked"})
    create_vm(a, prefill="random", workload="idle")
    with RunMonitor(shm_prefix) as mon:
        rc, report = migrate_cli(agents, a, b.addr, "--verify", "full")
        assert rc != 0, report
        assert report.get("verify_mode", "full") == "full", report
        assert_failed_on_source(a, b, shm_prefix, mon, report, 0)
    a.call("vm.delete", name=VM)


def test_incremental_verify_does_not_see_unmarked_corruption_control(agents, shm_prefix):
    """Control for the test above: the same fault is invisible to the incremental digests, so it
    is the full hash that catches it there (and the fault injection is really active)."""
    a = agents("A", *CONFIG)
    b = agents("B", *CONFIG, env={"LIVEMIG_FAULT_INJECT": "corrupt-unmarked"})
    create_vm(a, prefill="random", workload="idle")
    rc, report = migrate_cli(agents, a, b.addr, "--verify", "incremental")
    assert rc == 0 and report["status"] == "completed" and report["verified"] is True, report
    eventually(lambda: settled([a, b], VM, shm_prefix, hosts="B"), 20, what="VM on B only")
    b.call("vm.delete", name=VM)


def test_verify_full_without_a_fault_completes_verified(agents, shm_prefix):
    """Control: full verification itself passes on equal memory (a writing guest)."""
    a, b = agents("A", *CONFIG), agents("B", *CONFIG)
    create_vm(a)
    rc, report = migrate_cli(agents, a, b.addr, "--verify", "full")
    assert rc == 0 and report["status"] == "completed" and report["verified"] is True, report
    assert report.get("verify_mode", "full") == "full", report
    _, info = eventually(lambda: settled([a, b], VM, shm_prefix, min_writes=report["writes_at_pause"], hosts="B"),
                         20, what="VM on B only")
    assert_keeps_writing(b, VM, info["writes"])
    b.call("vm.delete", name=VM)


def test_byte_flipped_on_the_wire_is_caught_by_default_verify(agents, shm_prefix):
    # No TLS on this link: the proxy must see the frames (with TLS a flipped byte fails the record MAC
    # and the connection, before verification could say anything).
    a, b = agents("A", *CONFIG, insecure=True), agents("B", *CONFIG, insecure=True)
    create_vm(a, prefill="random")          # every page carries data: round 1 sends all 32 MiB
    host, port = b.addr.rsplit(":", 1)
    with RunMonitor(shm_prefix) as mon, \
            FlipProxy((host, int(port)), flip_after_bytes=8 * 2**20, min_page=1024) as proxy:
        w0 = writes(a, VM)
        rc, report = migrate_cli(agents, a, proxy.addr)          # default mode: incremental
        assert len(proxy.flipped) == 1 and proxy.flipped[0][0] >= 1024, proxy.flipped
        assert rc != 0, report
        assert report.get("verify_mode", "incremental") == "incremental", report
        assert_failed_on_source(a, b, shm_prefix, mon, report, w0)

    # Control: the same path, relaying unchanged, completes verified (the proxy itself is transparent).
    with FlipProxy((host, int(port)), flip_after_bytes=None) as relay:
        rc, report = migrate_cli(agents, a, relay.addr)
        assert relay.payload_bytes >= 8 * 2**20 and relay.flipped == []
    assert rc == 0 and report["status"] == "completed" and report["verified"] is True, report
    eventually(lambda: settled([a, b], VM, shm_prefix, min_writes=report["writes_at_pause"], hosts="B"), 20,
               what="VM on B only")
    b.call("vm.delete", name=VM)


def test_migrate_wait_exits_zero_only_when_completed_and_verified(agents, shm_prefix):
    a, b = agents("A", *CONFIG), agents("B", *CONFIG)
    bad = agents("C", *CONFIG, env={"LIVEMIG_FAULT_INJECT": "corrupt-page"})
    create_vm(a)
    rc, report = migrate_cli(agents, a, b.addr)
    assert (rc, report["status"], report["verified"]) == (0, "completed", True), report
    # Back from B to A, then to a destination whose memory ends up wrong: verification fails.
    rc, report = migrate_cli(agents, b, a.addr)
    assert rc == 0, report
    rc, report = migrate_cli(agents, a, bad.addr)
    assert rc != 0 and report["status"] == "failed" and report["verified"] is False, (rc, report)
    eventually(lambda: settled([a, b, bad], VM, shm_prefix, hosts="A"), 20, what="VM back on A, C discarded")
    a.call("vm.delete", name=VM)
