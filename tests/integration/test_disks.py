"""VM disks through real agents and real guests: create and attach, vm show,
io_writes, delete (and --keep-files), the disk maps in the orphan sweep,
restart re-adoption, and the live-migration refusal for a VM with disks."""
from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from agent.errors import AgentError
from memstore import BLOCK_SIZE, DiskImage, parse_disk_map_name
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(90)


def _maps(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix) and parse_disk_map_name(n))


def _record(a, vm: str) -> dict:
    with open(os.path.join(a.data_dir, "vms", f"{vm}.json")) as f:
        return json.load(f)


def test_create_show_delete_with_disks(agents, tmp_path):
    a = agents("A")
    own = str(tmp_path / "own.img")
    att = str(tmp_path / "attached.img")
    with DiskImage.create(att, 4 << 20) as img:                 # brought by the operator, with data in it
        img.write_blocks(3, b"\xab" * BLOCK_SIZE)
    info = a.call("vm.create", name="vm1", memory="16M", workload="idle:io=500",
                  disks=[{"name": "root", "size": "8M"}, {"name": "data", "size": "2M", "path": own}],
                  attach=[{"name": "old", "path": att}])
    default = os.path.join(a.data_dir, "disks", "vm1", "root.img")
    assert [(d["name"], d["path"], d["size_bytes"], d["attached"]) for d in info["disks"]] == [
        ("root", default, 8 << 20, False), ("data", own, 2 << 20, False), ("old", att, 4 << 20, True)]
    assert os.stat(default).st_size == 8 << 20
    wait_for(lambda: a.call("vm.show", name="vm1")["io_writes"] >= 200, 20, what="disk writes")
    wait_for(lambda: a.call("vm.show", name="vm1")["io_rate_wps"] > 0, 20, what="a disk write rate")
    shown = a.call("vm.show", name="vm1")
    assert sum(d["allocated_bytes"] for d in shown["disks"]) >= 200 * BLOCK_SIZE // 8   # writes land (spread)
    assert shown["disks"][2]["allocated_bytes"] >= BLOCK_SIZE
    maps = _maps(f"{agents.prefix}.A.vm1.")
    assert [m.rsplit(".", 1)[1] for m in maps] == ["d0", "d1", "d2"]
    assert _record(a, "vm1")["disks"][0]["path"] == default

    r = agents.cli(a, "vm", "show", "vm1")
    assert r.returncode == 0 and "root" in r.stdout and default in r.stdout and "(attached)" in r.stdout

    out = a.call("vm.delete", name="vm1")
    assert sorted(out["files_removed"]) == sorted([default, own]) and out["files_kept"] == [att]
    assert not os.path.exists(default) and not os.path.exists(own) and os.path.exists(att)
    assert not os.path.exists(os.path.dirname(default))              # its empty default folder goes too
    assert _maps(f"{agents.prefix}.A.vm1.") == []


def test_create_refusals_leave_nothing(agents, tmp_path):
    a = agents("A")
    cases = [
        (dict(workload="idle:io=10"), "needs a disk"),
        (dict(disks=[{"name": "d", "size": "100K"}]), "multiple of 64 KiB"),
        (dict(disks=[{"name": "d", "size": "1M"}], workload="idle:io=10,iows=2M"), "does not fit disk 0"),
        (dict(disks=[{"name": "d", "size": "1M"}, {"name": "d", "size": "1M", "path": str(tmp_path / "x")}]),
         "given twice"),
        (dict(disks=[{"name": "d/..", "size": "1M"}]), "bad disk name"),
        (dict(disks=[{"name": "d", "size": "1M", "path": str(tmp_path / "nodir" / "x.img")}]), "does not exist"),
        (dict(attach=[{"name": "d", "path": str(tmp_path / "missing.img")}]), "cannot open disk image"),
    ]
    for extra, msg in cases:
        with pytest.raises(AgentError, match=msg):
            a.call("vm.create", name="vm1", memory="16M", **extra)
    existing = tmp_path / "exists.img"
    existing.write_bytes(b"")
    with pytest.raises(AgentError, match="exists; use --attach"):
        a.call("vm.create", name="vm1", memory="16M", disks=[{"name": "d", "size": "1M", "path": str(existing)}])
    assert a.call("vm.list") == [] and _maps(f"{agents.prefix}.A.") == []
    assert not os.path.exists(os.path.join(a.data_dir, "disks", "vm1"))
    # one image cannot be two VMs' disk
    img = str(tmp_path / "shared.img")
    DiskImage.create(img, 1 << 20).close()
    a.call("vm.create", name="vm1", memory="16M", attach=[{"name": "d", "path": img}])
    with pytest.raises(AgentError, match="already a disk of VM vm1"):
        a.call("vm.create", name="vm2", memory="16M", attach=[{"name": "d", "path": img}])
    a.call("vm.delete", name="vm1")
    assert os.path.exists(img)


def test_keep_files_and_cli_forms(agents, tmp_path):
    a = agents("A")
    path = str(tmp_path / "keep.img")
    r = agents.cli(a, "vm", "create", "vm1", "--memory", "16M", "--workload", "idle:io=200",
                   "--disk", f"root:2M:{path}", "--disk", "swap:1M")
    assert r.returncode == 0, r.stderr
    assert "disk root 2.0 MiB" in r.stdout
    r = agents.cli(a, "vm", "create", "vm2", "--disk", "bad")
    assert r.returncode == 2 and "NAME:SIZE" in r.stderr
    r = agents.cli(a, "vm", "list")
    assert r.returncode == 0 and "DISKS" in r.stdout
    wait_for(lambda: a.call("vm.show", name="vm1")["io_writes"] > 50, 20, what="disk writes")
    r = agents.cli(a, "vm", "delete", "vm1", "--keep-files", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["files_removed"] == [] and path in out["files_kept"]
    assert os.path.exists(path) and os.stat(path).st_blocks > 0
    swap = os.path.join(a.data_dir, "disks", "vm1", "swap.img")
    assert os.path.exists(swap)
    # the kept images are plain images: attach them to a new VM, which writes on
    r = agents.cli(a, "vm", "create", "vm3", "--workload", "idle:io=200", "--attach", f"root:{path}",
                   "--attach", f"swap:{swap}")
    assert r.returncode == 0, r.stderr
    a.call("vm.delete", name="vm3")
    assert os.path.exists(path) and os.path.exists(swap)


def test_restart_readopts_disks_and_io_writes_continue(agents):
    a = agents("A")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=1000,io=500",
           disks=[{"name": "root", "size": "4M"}])
    wait_for(lambda: a.call("vm.show", name="vm1")["io_writes"] > 100, 20, what="disk writes")
    pid = a.call("vm.show", name="vm1")["guest_pid"]
    a.kill()
    os.kill(pid, signal.SIGKILL)                                  # the guest dies too: restarted from the segment
    psutil.wait_procs([psutil.Process(pid)], timeout=5) if psutil.pid_exists(pid) else None
    a.start()
    before = a.call("vm.show", name="vm1")
    assert before["guest_restarts"] == 1 and before["disks"][0]["name"] == "root"
    wait_for(lambda: a.call("vm.show", name="vm1")["io_writes"] > before["io_writes"] + 100, 20,
             what="disk writes after the restart")
    assert len(_maps(f"{agents.prefix}.A.vm1.")) == 1               # the map was kept, not swept
    a.call("vm.delete", name="vm1")


def test_sweep_keeps_maps_of_kept_segments_and_removes_orphans(agents, shm_prefix):
    a = agents("A")
    for vm in ("vm1", "vm2"):
        a.call("vm.create", name=vm, memory="16M", disks=[{"name": "root", "size": "1M"}])
    seg1 = a.call("vm.show", name="vm1")["segment"]
    pid1 = a.call("vm.show", name="vm1")["guest_pid"]
    a.kill()
    os.kill(pid1, signal.SIGKILL)
    os.unlink(os.path.join(a.data_dir, "vms", "vm1.json"))     # vm1: journaled, no record: an orphan
    foreign = f"/dev/shm/{shm_prefix}.A.other.00000000.d0"       # a map of a segment not in the journal
    with open(foreign, "wb"):
        pass
    try:
        a.start()
        assert not os.path.exists(f"/dev/shm/{seg1}") and not os.path.exists(f"/dev/shm/{seg1}.d0")
        seg2 = a.call("vm.show", name="vm2")["segment"]
        assert os.path.exists(f"/dev/shm/{seg2}.d0") and os.path.exists(foreign)
        a.call("vm.delete", name="vm2")
        assert not os.path.exists(f"/dev/shm/{seg2}.d0")
    finally:
        os.unlink(foreign)


def test_a_vm_with_disks_stays_migratable_and_drains(agents):
    """No feature blocks migration: a drain moves a VM with disks too (storage auto:
    on one machine the destination sees the same files, so they are shared)."""
    a, b = agents("A"), agents("B")
    a.call("vm.create", name="vm1", memory="16M", disks=[{"name": "root", "size": "1M"}])
    result = a.call("drain", to=[b.addr], wait=True, timeout_s=None)
    assert result["status"] == "completed" and result["vms_left"] == [], result
    assert result["vms"][0]["verified"] is True
    info = b.call("vm.show", name="vm1")
    assert info["state"] == "running" and [d["name"] for d in info["disks"]] == ["root"]
    b.call("vm.delete", name="vm1")
