"""deploy/testbed.sh for real: network namespaces, a bridge, veth pairs, tc tbf at 1 Gbit/s.

Root only (skipped with the reason otherwise). Each test uses its own short
prefix, so testbeds never collide; ``down`` runs in ``finally`` and the test
then asserts that no namespace, link, process or segment of its prefix is left.

What "within 10% of 1 Gbit/s" compares
--------------------------------------
tbf counts layer-2 bytes: every TCP segment costs its payload plus TCP
(20 + 12 timestamp option), IPv4 (20) and Ethernet (14) headers. At MTU
1500 a full segment carries 1448 payload bytes in a 1514-byte frame, so a
perfectly shaped 1 Gbit/s link moves at most 125e6 * 1448/1514 = 119.55e6
bytes/s of payload (95.6%). The report's bandwidth is payload bytes
(``bytes_sent``, page bytes only) over the copy phases (precopy +
stop-and-copy). We convert it to the layer-2 rate the shaper sees
(bytes * 1514/1448, plus the wire protocol's own frame headers from
``wire_bytes``) and require that to be within 10% of 125e6 bytes/s. The raw
payload rate must be within 10% of the configured rate too (it is ~98%:
the source counts bytes handed to its transport, and the transport's write
buffer, the socket send buffer and the qdisc still hold up to ~16 MiB when
the last round is written, so the copy phases end slightly before the last
byte crosses the link, which overstates the rate by that much; see VM_MEMORY).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest

from agent.control.server import ControlClient
from tests.conftest import wait_for

pytestmark = [pytest.mark.netns]

ROOT = Path(__file__).resolve().parents[2]
TESTBED = ROOT / "deploy" / "testbed.sh"
RATE_BPS = 125e6                      # 1 Gbit/s in bytes/s, layer 2
MTU = 1500
TCP_PAYLOAD = MTU - 20 - 20 - 12      # IPv4 + TCP + timestamps option
L2_FRAME = MTU + 14                   # + Ethernet header (tbf sees no FCS/preamble)
# Big enough that the bytes still buffered when the copy phases end (up to
# ~16 MiB: the 8 MiB transport write buffer, the socket send buffer, the
# qdisc) cannot move the measured rate by more than ~3%; with 128 MiB they
# inflated it by up to ~12% (measured: 98%..104% payload, 103%..109% L2).
VM_MEMORY = "512M"


def _netns_works() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, tc): run the multihost tests as root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    probe = f"lmprobe-{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        return f"`ip netns add` does not work here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)
    return None


@pytest.fixture(scope="module")
def netns_ok():
    reason = _netns_works()
    if reason:
        pytest.skip(reason)


def run_testbed(*args: str, timeout_s: float = 90.0, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TESTBED), *args], capture_output=True, text=True, timeout=timeout_s,
                          env=env)


def leftovers(prefix: str) -> dict[str, list]:
    shm_prefix = f"livemig-tb-{prefix}"
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if any(a == shm_prefix or a.startswith(shm_prefix + ".") for a in cmd):
            procs.append((p.pid, " ".join(cmd)[:100]))
    return {
        "namespaces": [n.split()[0] for n in ns.splitlines() if re.match(rf"lm-{prefix}-(br|h\d+)\b", n)],
        "links": [ln for ln in links.splitlines() if f"lmv-{prefix}-" in ln or f"lmbr-{prefix}" in ln],
        "processes": procs,
        "segments": [s for s in os.listdir("/dev/shm") if s.startswith(shm_prefix + ".")],
        "state": [str(p) for p in [Path("/run/livemig-testbed") / prefix] if p.exists()],
    }


def assert_clean(prefix: str) -> None:
    left = leftovers(prefix)
    assert not any(left.values()), f"testbed {prefix} left: {left}"


@pytest.fixture
def prefix(netns_ok):
    p = f"t{secrets.token_hex(3)}"
    yield p
    # belt and braces: a test that failed before its own `down` still cleans up
    if any(leftovers(p).values()):
        run_testbed("down", "--prefix", p)


@pytest.mark.timeout(240)
def test_migrate_between_two_hosts_at_1gbit(prefix):
    state = Path("/run/livemig-testbed") / prefix
    try:
        r = run_testbed("up", "2", "--rate", "1gbit", "--prefix", prefix)
        assert r.returncode == 0, r.stdout + r.stderr
        h1, h2 = str(state / "h1.sock"), str(state / "h2.sock")
        st1, st2 = ControlClient(h1).call("status"), ControlClient(h2).call("status")
        assert (st1["agent"], st1["listen"]) == ("h1", "198.18.0.1:7700")
        assert (st2["agent"], st2["listen"]) == ("h2", "198.18.0.2:7700")
        # mutual TLS, with the testbed's own throwaway CA: the migration below crosses it encrypted
        for st, name in ((st1, "h1"), (st2, "h2")):
            assert st["security"]["mode"] == "tls" and st["security"]["certificate"] == name, st["security"]
            assert f"livemig-testbed-{prefix}" in st["security"]["issuer"]
        qd = subprocess.run(["ip", "netns", "exec", f"lm-{prefix}-h1", "tc", "qdisc", "show", "dev", "eth0"],
                            capture_output=True, text=True).stdout
        assert "tbf" in qd and "rate 1Gbit" in qd, qd
        # everything lives in the testbed's namespaces: no link of it in the root namespace
        assert leftovers(prefix)["links"] == []

        vm = ControlClient(h1, timeout_s=120).call("vm.create", name="vm1", memory=VM_MEMORY, workload="idle",
                                                   prefill="random")
        assert vm["state"] == "running"
        report = ControlClient(h1, timeout_s=None).call("migrate", vm="vm1", to="198.18.0.2:7700", wait=True)
        (state / "report.json").write_text(json.dumps(report))
        assert report["status"] == "completed", report
        assert report["verified"] is True
        assert report["destination"] == "198.18.0.2:7700"
        assert ControlClient(h1).call("vm.list") == []
        assert [v["name"] for v in ControlClient(h2).call("vm.list")] == ["vm1"]

        ph = report["phases"]
        copy_s = (ph["precopy"] + ph["stop-and-copy"]) / 1000.0
        payload_bps = report["bytes_sent"] / copy_s
        framing = max(0, report.get("wire_bytes", report["bytes_sent"]) - report["bytes_sent"])
        l2_bps = (report["bytes_sent"] + framing) * L2_FRAME / TCP_PAYLOAD / copy_s
        inbound = ControlClient(h2).call("job.show", id=report["id"])
        iph = inbound.get("phases", {})
        in_s = (iph.get("precopy", 0) + iph.get("stop-and-copy", 0)) / 1000.0
        if in_s:       # what arrived, timed where it arrived: no send-buffer optimism (measured 119.3-119.5 MB/s)
            in_bps = inbound["bytes_sent"] / in_s
            print(f"\ndestination side: {in_bps / 1e6:.2f} MB/s payload over {in_s * 1000:.1f} ms "
                  f"(layer-2 equivalent {in_bps * L2_FRAME / TCP_PAYLOAD / RATE_BPS:.1%} of 1 Gbit/s)")
            assert abs(in_bps * L2_FRAME / TCP_PAYLOAD - RATE_BPS) <= 0.10 * RATE_BPS, inbound
        print(f"\nmeasured over {copy_s * 1000:.1f} ms: payload {payload_bps / 1e6:.2f} MB/s "
              f"({payload_bps / RATE_BPS:.1%} of 1 Gbit/s), layer-2 equivalent {l2_bps / 1e6:.2f} MB/s "
              f"({l2_bps / RATE_BPS:.1%})")
        assert report["bytes_sent"] >= 512 * 2**20          # random prefill: every page crosses the wire
        assert abs(l2_bps - RATE_BPS) <= 0.10 * RATE_BPS, (l2_bps, report)
        assert abs(payload_bps - RATE_BPS) <= 0.10 * RATE_BPS, (payload_bps, report)
    finally:
        r = run_testbed("down", "--prefix", prefix)
        assert r.returncode == 0, r.stdout + r.stderr
    assert_clean(prefix)


@pytest.mark.timeout(120)
def test_failed_up_cleans_up_after_itself(prefix, tmp_path):
    # an "agent" that exits at once (its `ca`/`cert` commands are the real ones, so the
    # testbed gets as far as starting it): up must notice, report it and remove what it created
    real = ROOT / ".venv" / "bin" / "livemig"
    fake = tmp_path / "livemig"
    fake.write_text(f"#!/bin/sh\ncase \"$1\" in ca|cert) exec {real} \"$@\";; esac\n"
                    "echo 'fake agent: exiting' >&2\nexit 3\n")
    fake.chmod(0o755)
    r = run_testbed("up", "2", "--rate", "100mbit", "--prefix", prefix, env=dict(os.environ, LIVEMIG=str(fake)))
    assert r.returncode != 0
    assert "exited" in r.stderr and "fake agent: exiting" in r.stderr, r.stderr
    assert_clean(prefix)


@pytest.mark.timeout(120)
def test_down_is_idempotent_and_status(prefix):
    for _ in range(2):
        r = run_testbed("down", "--prefix", prefix)
        assert r.returncode == 0, r.stderr
    r = run_testbed("status", "--prefix", prefix)
    assert r.returncode == 3 and "down" in r.stdout
    try:
        r = run_testbed("up", "1", "--prefix", prefix)
        assert r.returncode == 0, r.stderr
        r = run_testbed("up", "1", "--prefix", prefix)                 # already up: refused, nothing touched
        assert r.returncode == 2 and "already" in r.stderr
        r = run_testbed("status", "--prefix", prefix)
        assert r.returncode == 0 and "198.18.0.1/24" in r.stdout and "h1: agent pid" in r.stdout, r.stdout
        assert "security=tls" in r.stdout and re.search(r"security .*mode tls, certificate h1", r.stdout), r.stdout
        # an agent that died leaves a guest-less, socket-less host: down still removes everything
        pid = int((Path("/run/livemig-testbed") / prefix / "h1.pid").read_text())
        agent = psutil.Process(pid)
        agent.kill()
        wait_for(lambda: not agent.is_running() or agent.status() == psutil.STATUS_ZOMBIE, 10,
                 what="the killed agent to exit")
    finally:
        r = run_testbed("down", "--prefix", prefix)
        assert r.returncode == 0, r.stderr
    assert_clean(prefix)


def test_bad_arguments(netns_ok):
    assert run_testbed("up", "2", "--prefix", "waytoolongprefix").returncode == 2
    assert run_testbed("up", "2", "--prefix", "Bad_Name").returncode == 2
    assert run_testbed("up", "0", "--prefix", "tbad").returncode == 2
    assert run_testbed("up", "2", "--rate", "fast", "--prefix", "tbad").returncode == 2
    assert run_testbed("frobnicate").returncode == 2
    assert_clean("tbad")


@pytest.mark.timeout(240)
def test_shared_nothing_migration_with_a_writing_guest_at_1gbit(prefix):
    """A VM with a disk, its guest writing RAM and disk, moved shared-nothing over
    the testbed's 1 Gbit/s link: completed and verified, its disk now in h2's
    storage, the source file gone, both write counters going on on h2."""
    state = Path("/run/livemig-testbed") / prefix
    try:
        r = run_testbed("up", "2", "--rate", "1gbit", "--prefix", prefix)
        assert r.returncode == 0, r.stdout + r.stderr
        h1, h2 = ControlClient(str(state / "h1.sock"), timeout_s=120), ControlClient(str(state / "h2.sock"))
        h1.call("vm.create", name="vm1", memory="64M", workload="hotset:ws=8M,rate=2000,io=200,iows=16M",
                disks=[{"name": "root", "size": "64M"}])
        src = h1.call("vm.show", name="vm1")["disks"][0]["path"]
        wait_for(lambda: h1.call("vm.show", name="vm1")["io_writes"] > 50, 20, what="disk writes on h1")
        report = ControlClient(str(state / "h1.sock"), timeout_s=None).call(
            "migrate", vm="vm1", to="198.18.0.2:7700", wait=True, storage="copy")
        assert report["status"] == "completed" and report["verified"] is True, report
        assert report["storage_mode"] == "copy" and all(d["verified"] for d in report["disks"]), report
        assert not os.path.exists(src)                                   # deleted once h2 ran it
        info = h2.call("vm.show", name="vm1")
        assert info["disks"][0]["path"].startswith(str(state / "h2")), info["disks"]
        w, io = info["writes"], info["io_writes"]
        wait_for(lambda: (i := h2.call("vm.show", name="vm1"))["writes"] > w + 200 and i["io_writes"] > io + 20,
                 20, what="RAM and disk writes go on on h2")
        h2.call("vm.delete", name="vm1")
    finally:
        r = run_testbed("down", "--prefix", prefix)
        assert r.returncode == 0, r.stdout + r.stderr
    assert_clean(prefix)
