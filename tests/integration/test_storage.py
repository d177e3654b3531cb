"""Storage live migration against real agents, real guests writing their
disks and real filesystems (tmpfs mounts, a bind mount): the three move
forms, rename on one filesystem, the up-front refusals, the queue and its
limit, cancel in every phase, a heavy writer, verification catching a
changed byte, a full target filesystem. Every wait is a deadline-bounded
poll; every mount is unmounted and every VM deleted."""
from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess

import pytest

from agent.errors import AgentError
from memstore import BLOCK_SIZE, DiskImage
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(120)

HEAD = struct.Struct("<QQ")
KNOWN_FIRST = 200            # the known-content blocks of a test image: outside the guest's iows
KNOWN_COUNT = 48
DISK_SIZE = 64 << 20
IOWS = "4M"                  # the guest writes blocks [0, 64) only


@contextlib.contextmanager
def tmpfs(path: str, size: str = "256m"):
    """A tmpfs mounted at ``path`` (another filesystem than the data dir's), unmounted after."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        r = subprocess.run(["umount", path], capture_output=True)
        if r.returncode:
            subprocess.run(["umount", "-l", path], check=True)


@contextlib.contextmanager
def bind_mount(src: str, path: str):
    """``src`` bind-mounted at ``path``: the same filesystem, but rename(2) across answers EXDEV."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "--bind", src, path], check=True)
    try:
        yield path
    finally:
        r = subprocess.run(["umount", path], capture_output=True)
        if r.returncode:
            subprocess.run(["umount", "-l", path], check=True)


def known_image(path: str, size: int = DISK_SIZE, seed: int = 1) -> dict[int, bytes]:
    """A sparse image with pseudo-random data in KNOWN_COUNT blocks every
    other block from KNOWN_FIRST (holes between); returns {block: bytes}."""
    import random

    rnd = random.Random(seed)
    content = {}
    with DiskImage.create(path, size) as img:
        for i in range(KNOWN_COUNT):
            b = KNOWN_FIRST + 2 * i
            data = rnd.randbytes(BLOCK_SIZE)
            img.write_blocks(b, data)
            content[b] = data
    return content


def check_image(path: str, known: dict[int, bytes] | None, disk_index: int, ws_blocks: int) -> dict:
    """The image at ``path`` holds exactly the known blocks, guest blocks only
    inside the working set, all with one consistent tag (seed ^ disk << 56 ^
    block), and holes everywhere else. The guest must not be writing."""
    seeds = set()
    data_blocks = set()
    with DiskImage.open(path, readonly=True) as img:
        for first, count in img.data_blocks():
            for b in range(first, first + count):
                data = img.read_blocks(b, 1)
                if data == bytes(BLOCK_SIZE):
                    continue                          # an allocated zero block reads as a hole would
                data_blocks.add(b)
                if known and b in known:
                    assert data == known[b], f"{path}: block {b} differs from the image's original content"
                    continue
                assert b < ws_blocks, f"{path}: block {b} holds data outside the guest's working set"
                _, tag = HEAD.unpack_from(data)
                seeds.add(tag ^ (disk_index << 56) ^ b)
    if known:
        missing = set(known) - data_blocks
        assert not missing, f"{path}: known blocks {sorted(missing)[:5]} are missing"
    assert len(seeds) <= 1, f"{path}: guest blocks carry {len(seeds)} different seeds: a block is corrupt"
    return {"data_blocks": len(data_blocks), "seed": next(iter(seeds), None)}


def staging_files(*dirs: str) -> list[str]:
    out = []
    for d in dirs:
        if os.path.isdir(d):
            out += [os.path.join(d, n) for n in os.listdir(d) if ".livemig-" in n]
    return out


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


WS_BLOCKS = 64               # IOWS in blocks


# ---- VMs and checks -----------------------------------------------------------
def make_vm(a, tmp_path, *, name: str = "vm1", io: int = 1000, root_dir: str | None = None) -> dict[int, bytes]:
    """vm1: disk 0 "root" (created, 32M), disk 1 "data" (attached, known content);
    the guest writes both (io writes/s in their first 4M). Returns the known content."""
    known = known_image(str(tmp_path / f"{name}-data.img"))
    root = {"name": "root", "size": "32M"}
    if root_dir:
        root["path"] = os.path.join(root_dir, f"{name}-root.img")
    a.call("vm.create", name=name, memory="16M", workload=f"uniform:rate=1000,io={io},iows={IOWS}",
           disks=[root], attach=[{"name": "data", "path": str(tmp_path / f"{name}-data.img")}])
    if io:
        wait_for(lambda: a.call("vm.show", name=name)["io_writes"] > 100, 20, what="disk writes")
    return known


def io_writes(a, vm: str = "vm1") -> int:
    return a.call("vm.show", name=vm)["io_writes"]


def assert_writing(a, vm: str = "vm1", n: int = 100) -> None:
    w = io_writes(a, vm)
    wait_for(lambda: io_writes(a, vm) > w + n, 20, what=f"{vm} writes its disks")


def check_disks(a, known: dict[int, bytes], vm: str = "vm1", *, gone: list[str] = ()) -> list[dict]:
    """Each disk of the VM is exactly one complete file: the one its record names,
    of its size, with the right content; the paths in ``gone`` do not exist; no
    staging file next to any of them. Pauses the VM meanwhile."""
    a.call("vm.pause", name=vm)
    try:
        disks = a.call("vm.show", name=vm)["disks"]
        for i, d in enumerate(disks):
            assert os.stat(d["path"]).st_size == d["size_bytes"]
            check_image(d["path"], known if d["name"] == "data" else None, i, WS_BLOCKS)
            assert not staging_files(os.path.dirname(d["path"]))
        for p in gone:
            assert not os.path.exists(p), f"{p} should be gone"
            assert not staging_files(os.path.dirname(p))
    finally:
        a.call("vm.resume", name=vm)
    return disks


def wait_hold(a, phase: str, timeout_s: float = 30.0) -> str:
    path = os.path.join(a.data_dir, f"held.storage.{phase}")
    wait_for(lambda: os.path.exists(path), timeout_s, what=f"the move to hold at {phase}")
    with open(path) as f:
        return f.read()


def release(a, phase: str) -> None:
    os.unlink(os.path.join(a.data_dir, f"held.storage.{phase}"))


def job_state(a, job_id: str) -> str:
    return a.call("job.show", id=job_id)["status"]


def manifests(a) -> list[str]:
    d = os.path.join(a.data_dir, "storage")
    return os.listdir(d) if os.path.isdir(d) else []


# ---- the three forms -------------------------------------------------------------
def test_three_move_forms_on_a_writing_guest(agents, tmp_path):
    a = agents("A")
    with tmpfs(str(tmp_path / "t1")) as t1, tmpfs(str(tmp_path / "t2")) as t2:
        known = make_vm(a, tmp_path)
        before = a.call("vm.show", name="vm1")["disks"]
        w0 = io_writes(a)
        r = agents.cli(a, "storage", "move", "vm1", "--dest", t1, "--wait", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        rep = json.loads(r.stdout)
        written = (io_writes(a) - w0) * BLOCK_SIZE
        assert rep["kind"] == "storage" and rep["status"] == "completed" and rep["verified"] is True
        assert rep["error"] is None and 0 < rep["io_pause_ms"] < 1000
        assert [(d["name"], d["method"], d["from"], d["to"]) for d in rep["disks"]] == [
            (b["name"], "mirror", b["path"], os.path.join(t1, os.path.basename(b["path"]))) for b in before]
        for d in rep["disks"]:
            assert d["allocated_after"] <= d["allocated_before"] + written      # holes stayed holes
            assert d["bytes_copied"] >= d["allocated_before"] // 2 and d["io_pause_ms"] == rep["io_pause_ms"]
        assert rep["guest_write_wait_mirroring"]["samples"] > 0
        assert_writing(a)
        check_disks(a, known, gone=[b["path"] for b in before])

        r = agents.cli(a, "storage", "move", "vm1", "--only", "data", "--dest", t2, "--wait", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        rep = json.loads(r.stdout)
        assert [d["name"] for d in rep["disks"]] == ["data"]
        disks = a.call("vm.show", name="vm1")["disks"]
        assert os.path.dirname(disks[0]["path"]) == t1 and os.path.dirname(disks[1]["path"]) == t2

        back = str(tmp_path / "back")
        os.makedirs(back)
        r = agents.cli(a, "storage", "move", "vm1", "--map", f"root={t2}/r.img", "--map", f"data={back}",
                       "--wait", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        disks = a.call("vm.show", name="vm1")["disks"]
        assert [d["path"] for d in disks] == [os.path.join(t2, "r.img"),
                                             os.path.join(back, os.path.basename(disks[1]["path"]))]
        assert_writing(a)
        check_disks(a, known, gone=[os.path.join(t1, os.path.basename(before[0]["path"]))])
        jobs = [j for j in a.call("jobs") if j["kind"] == "storage"]
        assert len(jobs) == 3 and {j["state"] for j in jobs} == {"completed"}
        assert all(j["bytes_remaining"] == 0 and j["bytes_copied"] > 0 and j["rounds"] >= 2 for j in jobs)
        assert all(set(j["phases"]) >= {"queued", "scanning", "copying", "mirroring", "switching", "pivoting"}
                   and j["guest_write_wait_ms_max"] is not None for j in jobs)
        r = agents.cli(a, "job", jobs[0]["id"])
        assert r.returncode == 0 and "storage move" in r.stdout and "io pause" in r.stdout
        a.call("vm.delete", name="vm1")


def test_same_filesystem_is_a_rename_and_a_bind_mount_is_not(agents, tmp_path):
    a = agents("A")
    known = make_vm(a, tmp_path)
    src = a.call("vm.show", name="vm1")["disks"]
    ino = [os.stat(d["path"]).st_ino for d in src]
    other = tmp_path / "other"
    other.mkdir()
    rep = a.call("storage.move", vm="vm1", dest=str(other), wait=True, timeout_s=60)
    assert rep["status"] == "completed" and rep["verified"]
    assert [d["method"] for d in rep["disks"]] == ["rename", "rename"] and rep["bytes_copied"] == 0
    now = a.call("vm.show", name="vm1")["disks"]
    assert [os.stat(d["path"]).st_ino for d in now] == ino                     # the same files, renamed
    assert all(not os.path.exists(d["path"]) for d in src)
    assert_writing(a)
    check_disks(a, known)
    with bind_mount(str(tmp_path), str(tmp_path / "bound")) as bound:          # one filesystem, EXDEV
        rep = a.call("storage.move", vm="vm1", dest=bound, wait=True, timeout_s=60)
        assert rep["status"] == "completed" and [d["method"] for d in rep["disks"]] == ["mirror", "mirror"]
        assert_writing(a)
        check_disks(a, known, gone=[d["path"] for d in now])
        a.call("vm.delete", name="vm1")


# ---- refusals -------------------------------------------------------------------------
def test_refusals_name_the_disk_and_path_and_touch_nothing(agents, tmp_path):
    a = agents("A")
    make_vm(a, tmp_path, io=200)
    disks = a.call("vm.show", name="vm1")["disks"]
    root, data = disks[0]["path"], disks[1]["path"]
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / os.path.basename(root)).write_bytes(b"in the way")
    with tmpfs(str(tmp_path / "small"), "1m") as small:
        cases = [
            (dict(dest=str(dest)), f"disk root: the target {dest}/{os.path.basename(root)} exists "
                                   f"\\(use --overwrite"),
            (dict(map=[f"root={dest}/x.img", f"data={dest}/x.img"]), f"disks root and data are both mapped to "
                                                                     f"{dest}/x.img"),
            (dict(map=[f"data={data}"]), f"disk data: the target {data} is the source itself"),
            (dict(map=[f"data={root}"]), f"disk data: the target {root} is disk root of vm1"),
            (dict(dest=small), f"not enough free space for disk root \\({root} -> {small}/.*, disk data "
                               f"\\({data} -> {small}/.*bytes allocated, 1048576 bytes free"),
            (dict(dest=str(tmp_path / "nope")), "is not an existing directory"),
            (dict(dest=str(dest), only=["swap"]), "vm1 has no disk 'swap' \\(its disks: root, data\\)"),
            (dict(dest=str(dest), map=["root=/x"]), "either --dest"),
        ]
        for args, msg in cases:
            with pytest.raises(AgentError, match=msg):
                a.call("storage.move", vm="vm1", **args)
        assert os.listdir(small) == []
    assert sorted(os.listdir(dest)) == [os.path.basename(root)]
    assert [j for j in a.call("jobs") if j["kind"] == "storage"] == []
    r = agents.cli(a, "storage", "move", "vm1", "--dest", str(dest), "--json")
    assert r.returncode == 1 and "exists" in json.loads(r.stdout)["error"]
    r = agents.cli(a, "storage", "move", "vm1", "--map", "root")
    assert r.returncode == 2 and "NAME=PATH" in r.stderr
    # --overwrite replaces the file in the way
    rep = a.call("storage.move", vm="vm1", dest=str(dest), only=["root"], overwrite=True, wait=True, timeout_s=60)
    assert rep["status"] == "completed" and os.stat(dest / os.path.basename(root)).st_size == 32 << 20
    a.call("vm.delete", name="vm1")


# ---- queue, limit, exclusion, cancel ---------------------------------------------------------
def test_queue_limit_exclusion_and_cancel_in_every_phase(agents, tmp_path):
    a = agents("A", env={"LIVEMIG_TEST_HOLD": "storage:copying,storage:mirroring,storage:switching,"
                                              "storage:pivoting"})
    agents.cli(a, "config", "set", "max-storage-migrations", "1")
    with tmpfs(str(tmp_path / "t")) as t:
        known = {}
        for vm in ("vm1", "vm2"):
            known[vm] = make_vm(a, tmp_path, name=vm, io=500, root_dir=str(tmp_path))
        src1 = [d["path"] for d in a.call("vm.show", name="vm1")["disks"]]
        j1 = a.call("storage.move", vm="vm1", dest=t)["id"]
        assert wait_hold(a, "copying") == j1
        j2 = a.call("storage.move", vm="vm2", dest=t)["id"]
        wait_for(lambda: a.call("job.show", id=j2)["phases"] == {} and
                 [j for j in a.call("jobs") if j["id"] == j2][0]["state"] == "queued", 10, what="j2 queued")
        with pytest.raises(AgentError, match="already has a storage move"):
            a.call("storage.move", vm="vm1", dest=t)
        with pytest.raises(AgentError, match="storage move under way"):
            a.call("migrate", vm="vm1", to="127.0.0.1:1")
        with pytest.raises(AgentError, match="is migrating"):
            a.call("vm.delete", name="vm1")
        # cancel while queued, then while copying
        assert a.call("cancel", id=j2)["status"] == "cancelled"
        r = agents.cli(a, "cancel", j1)
        assert r.returncode == 0, r.stdout + r.stderr
        assert not os.path.exists(os.path.join(a.data_dir, "held.storage.copying"))
        assert [d["path"] for d in a.call("vm.show", name="vm1")["disks"]] == src1
        assert os.listdir(t) == [] and manifests(a) == []
        assert_writing(a, "vm1")
        # mirroring, then switching: released step by step, cancelled there
        for phase in ("mirroring", "switching"):
            j = a.call("storage.move", vm="vm1", dest=t)["id"]
            wait_hold(a, "copying")
            release(a, "copying")
            if phase == "switching":
                wait_hold(a, "mirroring")
                release(a, "mirroring")
            wait_hold(a, phase)
            rep = a.call("cancel", id=j)
            assert rep["status"] == "cancelled" and rep["error"] == "cancelled" and not rep["verified"]
            assert [d["path"] for d in a.call("vm.show", name="vm1")["disks"]] == src1
            assert os.listdir(t) == [] and manifests(a) == []
            assert_writing(a, "vm1")
        # pivoting is past cancel: refused, and the move completes once released
        j = a.call("storage.move", vm="vm1", dest=t)["id"]
        for phase in ("copying", "mirroring", "switching"):
            wait_hold(a, phase)
            release(a, phase)
        wait_hold(a, "pivoting")
        with pytest.raises(AgentError, match="can no longer be cancelled"):
            a.call("cancel", id=j)
        release(a, "pivoting")
        rep = a.call("job.wait", id=j, timeout_s=60)
        assert rep["status"] == "completed" and rep["verified"]
        assert_writing(a, "vm1")
        check_disks(a, known["vm1"], gone=src1)
        # a raised limit lets a queued move leave the queue at once
        back = tmp_path / "back"
        back.mkdir()
        j1 = a.call("storage.move", vm="vm1", dest=str(back))["id"]
        wait_hold(a, "copying")
        j2 = a.call("storage.move", vm="vm2", dest=t)["id"]
        assert [j for j in a.call("jobs") if j["id"] == j2][0]["state"] == "queued"
        r = agents.cli(a, "config", "set", "max-storage-migrations", "2")
        assert r.returncode == 0
        wait_for(lambda: [j for j in a.call("jobs") if j["id"] == j2][0]["state"] != "queued", 10,
                 what="the queued move to start")

        def released() -> bool:
            for n in os.listdir(a.data_dir):
                if n.startswith("held.storage."):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(a.data_dir, n))
            return all(job_state(a, j) != "running" for j in (j1, j2))

        wait_for(released, 60, what="both moves to end")
        assert job_state(a, j1) == job_state(a, j2) == "completed"
        for vm in ("vm1", "vm2"):
            check_disks(a, known[vm], vm)
            a.call("vm.delete", name=vm)
