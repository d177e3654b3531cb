"""Disk images (real sparse files on the test's filesystem) and disk maps
(real files in /dev/shm): geometry, holes found by SEEK_DATA, block IO,
punching, the map header and paths, the VM's disk table."""

from __future__ import annotations

import errno
import os

import pytest

from memstore.control import GuestState
from memstore.disk import (
    BLOCK_SIZE,
    PATH_MAX_BYTES,
    DiskImage,
    DiskMap,
    add_disk,
    disk_map_name,
    disk_sizes,
    list_disk_maps,
    list_disks,
    parse_disk_map_name,
    remove_disks,
    unlink_disk_maps,
)
from memstore.errors import DiskError, GuestError
from memstore.layout import PageRun
from memstore.segment import list_segments, segment_path

BS = BLOCK_SIZE


def block(fill: int) -> bytes:
    return bytes([fill]) * BS


# --- images --------------------------------------------------------------------

def test_create_is_sparse_and_exclusive(tmp_path):
    path = str(tmp_path / "a.img")
    with DiskImage.create(path, 64 * BS) as img:
        assert (img.size_bytes, img.nblocks, img.block_size) == (64 * BS, 64, BS)
        assert os.stat(path).st_size == 64 * BS
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        assert img.allocated_bytes() == 0          # every block a hole
        assert img.data_extents() == [] and img.data_blocks() == []
        assert img.read_blocks(0, 2) == bytes(2 * BS)
        assert img.allocated_bytes() == 0          # reading a hole allocates nothing
    with pytest.raises(DiskError, match="exists") as ei:
        DiskImage.create(path, BS)
    assert ei.value.errno == errno.EEXIST
    assert os.stat(path).st_size == 64 * BS        # the existing file is untouched


@pytest.mark.parametrize("size", [0, BS - 4096, BS + 1, -BS, True])
def test_create_bad_size_leaves_nothing(tmp_path, size):
    path = tmp_path / "bad.img"
    with pytest.raises(DiskError, match="multiple"):
        DiskImage.create(str(path), size)
    assert not path.exists()


def test_extents_follow_writes_and_punches(tmp_path):
    with DiskImage.create(str(tmp_path / "b.img"), 64 * BS) as img:
        img.write_blocks(3, block(1))
        img.write_blocks(10, block(2) + block(3))
        img.write_blocks(63, block(4))
        assert img.data_extents() == [(3 * BS, BS), (10 * BS, 2 * BS), (63 * BS, BS)]
        assert img.data_blocks() == [PageRun(3, 1), PageRun(10, 2), PageRun(63, 1)]
        assert img.data_extents(10 * BS + 4096, 40 * BS) == [(10 * BS + 4096, 2 * BS - 4096)]
        assert img.allocated_bytes() == 4 * BS
        assert img.read_blocks(10, 2) == block(2) + block(3)
        buf = bytearray(BS)
        img.readinto_blocks(63, buf)
        assert buf == block(4)
        img.fdatasync()
        img.fsync()
        img.drop_cache()
        assert img.read_blocks(3, 1) == block(1)   # read back from the device
        img.punch_blocks(10, 1)
        assert img.data_blocks() == [PageRun(3, 1), PageRun(11, 1), PageRun(63, 1)]
        assert img.read_blocks(10, 1) == bytes(BS)
        assert img.allocated_bytes() == 3 * BS
        assert os.fstat(img.fd).st_size == 64 * BS  # KEEP_SIZE


def test_block_bounds_and_partial_buffers(tmp_path):
    with DiskImage.create(str(tmp_path / "c.img"), 4 * BS) as img:
        with pytest.raises(ValueError, match="outside"):
            img.read_blocks(3, 2)
        with pytest.raises(ValueError, match="outside"):
            img.write_blocks(4, block(1))
        with pytest.raises(ValueError, match="whole"):
            img.write_blocks(0, b"x" * 100)
        with pytest.raises(ValueError, match="whole"):
            img.readinto_blocks(0, bytearray(100))


def test_open_existing_and_identity(tmp_path):
    path = str(tmp_path / "d.img")
    with DiskImage.create(path, 8 * BS) as img:
        img.write_blocks(5, block(9))
        ident = img.identity()
    with DiskImage.open(path, readonly=True) as img:
        assert img.size_bytes == 8 * BS and img.identity() == ident
        assert img.data_blocks() == [PageRun(5, 1)]
        with pytest.raises(DiskError) as ei:
            img.write_blocks(0, block(1))
        assert ei.value.errno == errno.EBADF
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(DiskError, match="multiple"):
        DiskImage.open(str(odd))
    with pytest.raises(DiskError, match="not a regular file"):
        DiskImage.open(str(tmp_path), readonly=True)
    with pytest.raises(DiskError) as ei:
        DiskImage.open(str(tmp_path / "missing.img"))
    assert ei.value.errno == errno.ENOENT


# --- disk maps ---------------------------------------------------------------------

def test_map_names():
    assert disk_map_name("livemig.A.vm.1234", 3) == "livemig.A.vm.1234.d3"
    assert parse_disk_map_name("livemig.A.vm.1234.d3") == ("livemig.A.vm.1234", 3)
    for name in ("livemig.A.vm.1234", "x.d", "x.d01", "x.d99", ".d1x"):
        assert parse_disk_map_name(name) is None
    with pytest.raises(ValueError):
        disk_map_name("x", 16)
    with pytest.raises(ValueError):
        disk_map_name("x" * 254, 0)      # name too long for the directory


def test_map_create_attach_and_paths(shm_prefix, tmp_path):
    seg = f"{shm_prefix}-vm"
    img = str(tmp_path / "m.img")
    dm = DiskMap.create(seg, 0, img, 100 * BS)
    try:
        assert (dm.index, dm.size_bytes, dm.block_size, dm.nblocks) == (0, 100 * BS, BS, 100)
        assert dm.path == img and dm.next_path == ""
        assert os.path.getsize(segment_path(dm.name)) == 4096 + 4096   # header + 100 bytes, padded
        assert os.stat(segment_path(dm.name)).st_blocks * 512 == 8192  # allocated up front
        assert len(dm.dirty) == 100 and not any(dm.dirty)
        with DiskMap.attach(seg, 0) as other:
            other.stage_path(str(tmp_path / "next.img"))
            other.dirty[7] = 1
        assert dm.next_path == str(tmp_path / "next.img")
        dm.commit_path(dm.next_path)
        assert dm.path == str(tmp_path / "next.img")
        col = dm.collector()
        assert col.collect() == [PageRun(7, 1)] and not any(dm.dirty)
        with pytest.raises(DiskError, match=str(PATH_MAX_BYTES)):
            dm.stage_path("/" + "p" * PATH_MAX_BYTES)
        assert dm.next_path == str(tmp_path / "next.img")   # a refused path changes nothing
        with pytest.raises(DiskError, match="exists"):
            DiskMap.create(seg, 0, img, BS)
        with pytest.raises(DiskError, match="does not match"):
            _attach_renamed(seg, dm)
    finally:
        dm.close()
        dm.unlink()
    assert list_segments(shm_prefix) == []
    with pytest.raises(ValueError):
        col.collect()                    # views released with the map


def _attach_renamed(seg, dm):
    """Attach map 0's file under index 1: the header's index must refuse it."""
    os.link(segment_path(dm.name), segment_path(disk_map_name(seg, 1)))
    try:
        DiskMap.attach(seg, 1)
    finally:
        os.unlink(segment_path(disk_map_name(seg, 1)))


def test_map_attach_rejects_garbage(shm_prefix):
    seg = f"{shm_prefix}-junk"
    path = segment_path(disk_map_name(seg, 0))
    with open(path, "wb") as f:
        f.write(bytes(8192))
    try:
        with pytest.raises(DiskError, match="not a livemig disk map"):
            DiskMap.attach(seg, 0)
    finally:
        os.unlink(path)
    with pytest.raises(DiskError) as ei:
        DiskMap.attach(seg, 0)
    assert ei.value.errno == errno.ENOENT


def test_vm_disk_table(make_ram, tmp_path, shm_prefix):
    ram = make_ram("tbl", 1 << 20)
    paths = []
    for i, size in enumerate((16 * BS, 4 * BS)):
        paths.append(str(tmp_path / f"t{i}.img"))
        DiskImage.create(paths[-1], size).close()
    assert list_disks(ram) == [] and ram.ctl.ndisks == 0
    d0 = add_disk(ram, paths[0])
    d1 = add_disk(ram, paths[1])
    assert ram.ctl.ndisks == 2
    assert [d.index for d in (d0, d1)] == [0, 1]
    assert list_disks(ram) == [d0, d1]
    assert d1.path == paths[1] and d1.size_bytes == 4 * BS and d1.nblocks == 4
    assert disk_sizes(ram) == [16 * BS, 4 * BS]
    assert list_disk_maps(ram.name) == [f"{ram.name}.d0", f"{ram.name}.d1"]
    with pytest.raises(DiskError):
        add_disk(ram, str(tmp_path / "missing.img"))
    assert ram.ctl.ndisks == 2
    ram.ctl.guest_state = GuestState.RUNNING        # as a running guest reports it
    with pytest.raises(GuestError, match="while its guest runs"):
        add_disk(ram, paths[0])
    with pytest.raises(GuestError):
        remove_disks(ram)
    ram.ctl.guest_state = GuestState.STOPPED
    assert remove_disks(ram) == [f"{ram.name}.d0", f"{ram.name}.d1"]
    assert ram.ctl.ndisks == 0 and list_disk_maps(ram.name) == []
    assert all(os.path.exists(p) for p in paths)    # images are the agent's to delete
    assert unlink_disk_maps(ram.name) == []
    assert list_segments(shm_prefix) == [ram.name]
