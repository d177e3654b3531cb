"""Live migration of VMs with disks between two real agents (issue 11).

copy (shared-nothing): separate data dirs on 127.0.0.1, a guest writing RAM
and disk; shared: both agents see one directory; refusals: a destination
without space (a small tmpfs), a "shared" file the destination cannot see;
SIGKILL of either agent during the disk copy, the pre-copy and the switch.
In every case the VM runs on exactly one host with complete disks (every
block the guest wrote carries its io counter stamp: checked by reading the
image), and nothing is left behind.
"""
from __future__ import annotations

import os
import signal
import struct
import subprocess

import pytest

from agent.migration import testhooks
from memstore import BLOCK_SIZE
from tests.conftest import wait_for
from tests.tools.checks import assert_keeps_writing, call, eventually, free_addr, vm_info


def until(cond, timeout_s: float, what: str):
    """Poll until ``cond()`` is true (an agent that is down or restarting counts as not yet)."""
    def check():
        assert cond(), what
    return eventually(check, timeout_s, what=what)

pytestmark = pytest.mark.timeout(120)

VM = "vm1"
WORKLOAD = "hotset:ws=4M,rate=2000,io=300,iows=8M"
CONFIG = ("--set", "migration.io_timeout_s=3", "--set", "migration.handshake_timeout_s=3",
          "--set", "migration.guest_ack_timeout_s=3", "--set", "migration.resolve_timeout_s=20",
          "--set", "migration.switchover_timeout_ms=3000")


def _files(root: str) -> list[str]:
    out = []
    for d, _, fs in os.walk(root):
        out += [os.path.join(d, f) for f in fs]
    return sorted(out)


def _disk_files(ag) -> list[str]:
    return [f for f in _files(ag.data_dir) if "/disks/" in f or "incoming-storage" in f]


def _image_ok(path: str, size: int) -> int:
    """Every written block holds its header (io counter, seed pattern); returns how many are written."""
    n = 0
    with open(path, "rb") as f:
        assert os.fstat(f.fileno()).st_size == size
        for b in range(size // BLOCK_SIZE):
            head = os.pread(f.fileno(), 16, b * BLOCK_SIZE)
            if head != bytes(16):
                counter, _ = struct.unpack("<QQ", head)
                assert counter > 0
                n += 1
    return n


def _make_vm(ag, disks=None, **kw):
    return call(ag, "vm.create", name=VM, memory="32M", workload=WORKLOAD,
                disks=disks or [{"name": "root", "size": "16M"}, {"name": "data", "size": "8M"}], **kw)


@pytest.fixture
def pair(agents):
    """Start A and B (B with extra flags); at the end the VM is deleted wherever it is."""
    started = []

    def make(*extra_b, env_a=None, env_b=None):
        a = agents("A", *CONFIG, listen=free_addr(), env=env_a)
        b = agents("B", *CONFIG, *extra_b, listen=free_addr(), env=env_b)
        started.extend((a, b))
        return a, b
    yield make
    for ag in started:
        try:
            if vm_info(ag, VM) is not None:
                call(ag, "vm.delete", name=VM)
        except Exception:
            pass


def _restart_without_hold(agents, ag):
    if ag.env is not None:
        ag.env = {k: v for k, v in ag.env.items() if k != testhooks.ENV}
    agents.restart(ag)


def test_copy_with_a_writing_guest(pair):
    a, b = pair()
    info = _make_vm(a)
    src_paths = [d["path"] for d in info["disks"]]
    wait_for(lambda: vm_info(a, VM)["io_writes"] > 300, 20, what="disk writes")
    r = call(a, "migrate", vm=VM, to=b.addr, wait=True, storage="copy")   # auto would find the files shared: one host
    assert r["status"] == "completed", (r["error"], r)
    assert r["verified"] and r["storage_mode"] == "copy"
    assert all(d["verified"] for d in r["disks"])
    assert r["bytes_sent"] >= sum(d["bytes_copied"] for d in r["disks"]) > 0
    io_at_pause = r["writes_at_pause"]
    shown = vm_info(b, VM)
    assert [d["name"] for d in shown["disks"]] == ["root", "data"]
    dst_paths = [d["path"] for d in shown["disks"]]
    assert all(p.startswith(os.path.join(b.data_dir, "disks", VM)) for p in dst_paths)
    io0 = shown["io_writes"]
    assert io0 > 0 and shown["writes"] >= io_at_pause
    wait_for(lambda: vm_info(b, VM)["io_writes"] > io0 + 100, 20, what="disk writes go on on B")
    assert_keeps_writing(b, VM, shown["writes"])
    assert vm_info(a, VM) is None
    for p in src_paths:
        assert not os.path.exists(p)
    assert _disk_files(a) == []
    assert [f for f in _files(b.data_dir) if "incoming-storage" in f] == []
    # The copy is complete: the destination's files hold the guest's stamped blocks.
    call(b, "vm.pause", name=VM)
    assert sum(_image_ok(p, s) for p, s in zip(dst_paths, (16 << 20, 8 << 20))) > 0
    call(b, "vm.delete", name=VM)


def test_shared_moves_only_memory_and_keeps_the_files(pair, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    a, b = pair()
    disks = [{"name": "root", "size": "16M", "path": str(shared / "root.img")}]
    _make_vm(a, disks=disks)
    wait_for(lambda: vm_info(a, VM)["io_writes"] > 200, 20, what="disk writes")
    ino = os.stat(shared / "root.img").st_ino
    r = call(a, "migrate", vm=VM, to=b.addr, wait=True)       # auto: B sees the file
    assert r["status"] == "completed" and r["verified"] and r["storage_mode"] == "shared", r
    assert r["bytes_sent"] <= 32 << 20                                 # memory only
    assert r["disks"][0]["bytes_copied"] == 0
    assert os.stat(shared / "root.img").st_ino == ino
    assert sorted(os.listdir(shared)) == ["root.img"]                  # no probe token left
    shown = vm_info(b, VM)
    assert shown["disks"][0]["path"] == str(shared / "root.img")
    io0 = shown["io_writes"]
    wait_for(lambda: vm_info(b, VM)["io_writes"] > io0 + 100, 20, what="disk writes go on on B")
    call(b, "vm.pause", name=VM)
    assert _image_ok(str(shared / "root.img"), 16 << 20) > 0
    call(b, "vm.delete", name=VM, keep_files=True)


def test_failed_shared_migration_deletes_nothing(pair, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    a, b = pair(env_b={"LIVEMIG_FAULT_INJECT": "corrupt-page"})
    _make_vm(a, disks=[{"name": "root", "size": "16M", "path": str(shared / "root.img")}])
    ino = os.stat(shared / "root.img").st_ino
    r = call(a, "migrate", vm=VM, to=b.addr, wait=True, storage="shared")
    assert r["status"] == "failed" and "differ" in r["error"], r
    assert os.stat(shared / "root.img").st_ino == ino and sorted(os.listdir(shared)) == ["root.img"]
    until(lambda: vm_info(b, VM) is None, 15, what="B discards its shell")
    assert vm_info(a, VM)["state"] == "running"
    io0 = vm_info(a, VM)["io_writes"]
    wait_for(lambda: vm_info(a, VM)["io_writes"] > io0 + 50, 20, what="disk writes go on on A")


def test_shared_refused_when_the_destination_cannot_see_the_file(pair, tmp_path):
    a, b = pair("--set", f"storage.shared_paths={tmp_path}=/nonexistent-livemig")
    _make_vm(a, disks=[{"name": "root", "size": "16M", "path": str(tmp_path / "root.img")}])
    r = call(a, "migrate", vm=VM, to=b.addr, wait=True, storage="shared")
    assert r["status"] == "failed" and "cannot see the shared disk root" in r["error"], r
    assert [f for f in os.listdir(tmp_path) if "livemig-probe" in f] == []
    # B refuses at admission: no shell, no job was ever created there
    assert vm_info(b, VM) is None and call(b, "jobs") == []
    assert vm_info(a, VM)["state"] == "running"
    # auto falls back to a copy
    r = call(a, "migrate", vm=VM, to=b.addr, wait=True)
    assert r["status"] == "completed" and r["storage_mode"] == "copy", r["error"]
    assert not os.path.exists(tmp_path / "root.img")
    call(b, "vm.delete", name=VM)


def _mount_tmpfs(path, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_destination_without_space_refuses(pair, tmp_path):
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "4m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        a, b = pair()
        _make_vm(a)
        wait_for(lambda: vm_info(a, VM)["io_writes"] > 200, 20, what="disk writes")
        r = call(a, "migrate", vm=VM, to=b.addr, wait=True, storage="copy", storage_dest=str(small))
        assert r["status"] == "failed" and "not enough disk space" in r["error"], r
        assert os.listdir(small) == []
        until(lambda: vm_info(b, VM) is None, 15, what="B discards its shell")
        assert vm_info(a, VM)["state"] == "running" and _disk_files(b) == []
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


@pytest.mark.parametrize("victim,phase", [("B", "precopy"), ("A", "precopy"), ("B", "stop-and-copy"),
                                          ("A", "stop-and-copy"), ("B", "commit")])
def test_kill_during_copy(agents, pair, victim, phase):
    role = "destination" if victim == "B" else "source"
    hold = {"LIVEMIG_TEST_HOLD": f"{role}:{phase}"}
    a, b = pair(env_a=hold if victim == "A" else None, env_b=hold if victim == "B" else None)
    info = _make_vm(a)
    src_paths = [d["path"] for d in info["disks"]]
    wait_for(lambda: vm_info(a, VM)["io_writes"] > 200, 20, what="disk writes")
    job = call(a, "migrate", vm=VM, to=b.addr, storage="copy")
    held = os.path.join((a if victim == "A" else b).data_dir, f"held.{role}.{phase}")
    wait_for(lambda: os.path.exists(held), 30, what=f"the hold at {role}:{phase}")
    if phase == "precopy" and victim == "B":       # let part of the disk arrive first
        os.unlink(held)
        wait_for(lambda: any("livemig-" in f for f in _disk_files(b)), 10, what="a staging file")
    ag = a if victim == "A" else b
    ag.proc.send_signal(signal.SIGKILL)
    ag.proc.wait(10)
    if os.path.exists(held):
        os.unlink(held)
    _restart_without_hold(agents, ag)
    ends_on = b if phase == "commit" else a
    other = a if ends_on is b else b
    until(lambda: vm_info(ends_on, VM) is not None and vm_info(ends_on, VM)["state"] == "running"
               and vm_info(other, VM) is None and not call(a, "jobs", running=True)
               and not call(b, "jobs", running=True), 40, what=f"{VM} running on {ends_on.name} only")
    shown = vm_info(ends_on, VM)
    io0 = shown["io_writes"]
    wait_for(lambda: vm_info(ends_on, VM)["io_writes"] > io0 + 50, 20, what="disk writes go on")
    paths = [d["path"] for d in shown["disks"]]
    if ends_on is a:
        assert paths == src_paths
        until(lambda: _disk_files(b) == [], 10, what="no copy left on B")
    else:
        until(lambda: not any(os.path.exists(p) for p in src_paths), 20, what="source files removed")
        assert [f for f in _files(b.data_dir) if "incoming-storage" in f or "livemig-" in f] == []
    call(ends_on, "vm.pause", name=VM)
    assert sum(_image_ok(p, s) for p, s in zip(paths, (16 << 20, 8 << 20))) > 0
    call(ends_on, "vm.delete", name=VM)
    assert job["id"]
