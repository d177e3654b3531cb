"""Metrics from real agents: in-flight gauges during a (slowed) migration and gone after it,
the failure reason of a real failure, build info, limits, maintenance, and ``[metrics] listen``
from the TOML file."""
from __future__ import annotations

import importlib.metadata
import socket

import pytest

from agent.control.proc import wait_for
from tests.deploy.test_metrics import parse_exposition, value

pytestmark = pytest.mark.timeout(120)

IN_FLIGHT = ("livemig_migration_data_remaining_bytes", "livemig_migration_data_processed_bytes",
             "livemig_migration_data_total_bytes", "livemig_migration_dirty_memory_rate_bytes_per_second",
             "livemig_migration_memory_transfer_rate_bytes_per_second", "livemig_migration_expected_downtime_seconds",
             "livemig_migration_guest_throttle_ratio", "livemig_migration_round")
MEMORY = 48 * 2**20
BANDWIDTH_MIBPS = 12             # 48 MiB of random pages: about 4 s of round 1


def scrape(addr: str) -> dict[str, dict]:
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.settimeout(10)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return parse_exposition(body.decode())


def series(fams: dict, name: str) -> list[tuple[dict, float]]:
    return [(lb, v) for _, lb, v in fams[name]["samples"]]


def metrics_config(tmp_path) -> str:
    path = tmp_path / "metrics.toml"
    path.write_text('[metrics]\n# the endpoint from the config file, no --metrics flag\nlisten = "127.0.0.1:0"\n')
    return str(path)


def test_in_flight_gauges_during_a_migration_and_not_after(agents, tmp_path):
    a = agents("A", "--config", metrics_config(tmp_path))          # [metrics] listen from the TOML
    b = agents("B", "--metrics", "127.0.0.1:0")
    a_addr, b_addr = a.call("status")["metrics"], b.call("status")["metrics"]
    assert a_addr and a_addr.startswith("127.0.0.1:") and not a_addr.endswith(":0")

    fams = scrape(a_addr)
    info = series(fams, "livemig_build_info")
    assert info == [({"version": importlib.metadata.version("livemig"), "python": info[0][0]["python"]}, 1)]
    assert value(fams, "livemig_limit_live_migrations") == a.call("status")["max_live_migrations"]
    assert value(fams, "livemig_maintenance") == 0
    for name in IN_FLIGHT:
        assert series(fams, name) == [], name                        # no migration: no series

    a.call("vm.create", name="vm1", memory="48M", workload="uniform:rate=3000", prefill="random")
    job = a.call("migrate", vm="vm1", to=b.addr, max_bandwidth_mibps=BANDWIDTH_MIBPS)
    want = {"vm": "vm1", "job": job["id"], "direction": "outbound"}

    def moving():
        f = scrape(a_addr)
        s = series(f, "livemig_migration_data_processed_bytes")
        return f if s and s[0][1] > 2**20 else None

    fams = wait_for(moving, timeout_s=30, interval_s=0.05, what="bytes moving in the outbound gauges")
    for name in IN_FLIGHT:
        assert [lb for lb, _ in series(fams, name)] == [want], name
    assert value(fams, "livemig_migration_data_total_bytes", job=job["id"]) == MEMORY
    remaining = value(fams, "livemig_migration_data_remaining_bytes", job=job["id"])
    processed = value(fams, "livemig_migration_data_processed_bytes", job=job["id"])
    assert 0 < processed < MEMORY and 0 < remaining <= MEMORY          # mid-way through round 1
    assert value(fams, "livemig_migration_memory_transfer_rate_bytes_per_second", job=job["id"]) \
        <= BANDWIDTH_MIBPS * 2**20 * 1.5                              # the cap holds (meter window slack)
    assert value(fams, "livemig_migrations_running") == 1

    inbound = wait_for(lambda: (f := scrape(b_addr)) and series(f, "livemig_migration_data_processed_bytes")
                       and f, timeout_s=30, interval_s=0.05, what="the inbound series")
    assert [lb for lb, _ in series(inbound, "livemig_migration_data_remaining_bytes")] == [
        {"vm": "vm1", "job": job["id"], "direction": "inbound"}]      # the destination's job has the same id

    report = a.call("job.wait", id=job["id"], timeout_s=90)
    assert report["status"] == "completed", report
    after = scrape(a_addr)
    for name in IN_FLIGHT:
        assert series(after, name) == [], name                       # gone with the job
    assert value(after, "livemig_migrations_completed_total", direction="outbound") == 1
    assert value(after, "livemig_migration_transferred_bytes_total", direction="outbound") == report["bytes_sent"]
    assert value(after, "livemig_migration_transferred_pages_total", direction="outbound") == report["pages_sent"]
    assert value(after, "livemig_migrations_running") == 0
    inbound_report = b.call("job.show", id=job["id"])
    b_after = wait_for(lambda: (f := scrape(b_addr)) and
                       value(f, "livemig_migrations_completed_total", direction="inbound") == 1 and f,
                       timeout_s=30, what="the inbound job to end")
    for name in IN_FLIGHT:
        assert series(b_after, name) == [], name
    assert value(b_after, "livemig_migration_transferred_bytes_total", direction="inbound") == \
        inbound_report["bytes_sent"] > 0                            # received bytes, under an honest name

    # maintenance: drain an empty host (its VM left) sets it, undrain clears it
    a.call("drain", to=[b.addr], wait=True)
    assert value(scrape(a_addr), "livemig_maintenance") == 1
    a.call("undrain")
    assert value(scrape(a_addr), "livemig_maintenance") == 0
    a.call("config.set", key="max_live_migrations", value=5)
    assert value(scrape(a_addr), "livemig_limit_live_migrations") == 5
    b.call("vm.delete", name="vm1")


def test_a_lost_destination_is_counted_as_a_peer_failure(agents):
    a = agents("A", "--metrics", "127.0.0.1:0")
    b = agents("B")
    a_addr = a.call("status")["metrics"]
    a.call("vm.create", name="vm1", memory="48M", workload="uniform:rate=2000", prefill="random")
    job = a.call("migrate", vm="vm1", to=b.addr, max_bandwidth_mibps=BANDWIDTH_MIBPS)
    wait_for(lambda: series(scrape(a_addr), "livemig_migration_data_processed_bytes"), timeout_s=30,
             interval_s=0.05, what="the migration to run")
    b.kill()                                                           # the destination dies mid-copy
    report = a.call("job.wait", id=job["id"], timeout_s=90)
    assert report["status"] == "failed", report
    fams = scrape(a_addr)
    assert value(fams, "livemig_migrations_failed_total", direction="outbound", reason="peer") == 1, report["error"]
    assert sum(v for _, v in series(fams, "livemig_migrations_failed_total")) == 1
    for name in IN_FLIGHT:
        assert series(fams, name) == [], name
    assert a.call("vm.show", name="vm1")["state"] == "running"        # rolled back, still here
    a.call("vm.delete", name="vm1")
    agents.restart(b)                                                 # sweeps the shell it left in /dev/shm
