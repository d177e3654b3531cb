import mmap
import os
import stat
import time

import pytest

from memstore import segment as segment_mod
from memstore.control import LAYOUT_VERSION, MAGIC
from memstore.errors import SegmentError
from memstore.layout import PAGE_SIZE
from memstore.segment import (
    GuestRam,
    list_segments,
    ram_offset_for,
    segment_exists,
    segment_path,
    segment_size_for,
    unlink_segment,
)


@pytest.mark.parametrize(
    "npages, ram_offset, total",
    [
        (1, 8192, 8192 + 4096),
        (256, 8192, 8192 + (1 << 20)),  # the 1 MiB example of the docstring
        (4096, 8192, 8192 + (16 << 20)),
        (4097, 12288, 12288 + 4097 * 4096),
        (262144, 266240, 266240 + (1 << 30)),  # 1 GiB
    ],
)
def test_layout_offsets(npages, ram_offset, total):
    assert ram_offset_for(npages) == ram_offset
    assert segment_size_for(npages) == total


def test_create_attach_share_memory(make_ram, shm_prefix):
    ram = make_ram("a", 1 << 20)
    assert ram.path == f"/dev/shm/{shm_prefix}-a" == segment_path(ram.name)
    assert (ram.npages, ram.size_bytes, ram.ram_offset) == (256, 1 << 20, 8192)
    assert len(ram.ram) == 1 << 20 and len(ram.dirty) == 256
    st = os.fstat(ram.fd)
    assert st.st_size == 8192 + (1 << 20)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (ram.ctl.magic, ram.ctl.layout_version, ram.ctl.npages) == (MAGIC, LAYOUT_VERSION, 256)
    assert segment_exists(ram.name)
    ram.ram[5 * PAGE_SIZE : 5 * PAGE_SIZE + 5] = b"hello"
    ram.dirty[5] = 1
    ram.ctl.seed = 77
    with GuestRam.attach(ram.name) as other:
        assert other.npages == 256 and other.ctl.seed == 77
        assert bytes(other.ram[5 * PAGE_SIZE : 5 * PAGE_SIZE + 5]) == b"hello"
        assert other.dirty[5] == 1
        other.ram[-3:] = b"end"
    assert bytes(ram.ram[-3:]) == b"end"
    # file offsets are what os.sendfile/pread would use
    assert os.pread(ram.fd, 5, ram.file_offset(5)) == b"hello"
    assert ram.file_offset(ram.npages) == st.st_size


def test_fresh_segment_is_zero_and_header_backed(make_ram):
    ram = make_ram("z", 1 << 20)
    # only the header pages (control + dirty map) are allocated up front
    assert os.fstat(ram.fd).st_blocks * 512 == ram.ram_offset
    assert bytes(ram.ram) == bytes(1 << 20) and bytes(ram.dirty) == bytes(256)


def test_exclusive_create(make_ram):
    ram = make_ram("x")
    ram.ctl.seed = 5
    with pytest.raises(SegmentError, match="already exists"):
        GuestRam.create(ram.name, 1 << 20)
    assert segment_exists(ram.name)  # the failed create leaves the existing file alone
    with GuestRam.attach(ram.name) as again:
        assert again.ctl.seed == 5


@pytest.mark.parametrize("size", [0, 4095, 1000, -4096])
def test_create_bad_size_leaves_nothing(shm_prefix, size):
    with pytest.raises(SegmentError, match="multiple of 4096"):
        GuestRam.create(f"{shm_prefix}-bad", size)
    assert list_segments(shm_prefix) == []


@pytest.mark.parametrize("name", ["", "a/b", ".", "..", "x\0y", "n" * 256])
def test_bad_names(name):
    with pytest.raises(SegmentError):
        GuestRam.create(name, 4096)
    with pytest.raises(SegmentError):
        GuestRam.attach(name)
    with pytest.raises(ValueError):
        segment_path(name)


def test_create_failure_after_open_unlinks(shm_prefix, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError(12, "no mapping for you")

    monkeypatch.setattr(segment_mod.mmap, "mmap", boom)
    with pytest.raises(SegmentError, match="no mapping for you"):
        GuestRam.create(f"{shm_prefix}-fail", 1 << 20)
    assert list_segments(shm_prefix) == []


def _corrupt(path, offset, data):
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "offset, data, msg",
    [
        (0, b"NOTLIVE!", "not a livemig segment"),
        (8, (2).to_bytes(8, "little"), "layout version 2"),
        (16, (255).to_bytes(8, "little"), "header says 255 pages"),
        (16, (0).to_bytes(8, "little"), "header says 0 pages"),
    ],
)
def test_attach_rejects_bad_header(make_ram, offset, data, msg):
    ram = make_ram("hdr", 1 << 20)
    _corrupt(ram.path, offset, data)
    with pytest.raises(SegmentError, match=msg):
        GuestRam.attach(ram.name)


def test_attach_rejects_wrong_size_and_missing(make_ram, shm_prefix):
    ram = make_ram("trunc", 1 << 20)
    os.truncate(ram.path, segment_size_for(256) - PAGE_SIZE)
    with pytest.raises(SegmentError, match="header says 256 pages"):
        GuestRam.attach(ram.name)
    with pytest.raises(SegmentError, match="does not exist"):
        GuestRam.attach(f"{shm_prefix}-missing")
    small = f"/dev/shm/{shm_prefix}-small"
    with open(small, "wb") as f:
        f.write(b"tiny")
    with pytest.raises(SegmentError, match="too small"):
        GuestRam.attach(f"{shm_prefix}-small")


def test_close_is_idempotent_and_releases_views(make_ram):
    ram = make_ram("c")
    fd = ram.fd
    with ram:
        view = ram.page_view(2, 3)
        assert len(view) == 3 * PAGE_SIZE
        view.release()
    assert ram.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    ram.close()
    for v in (ram.ram, ram.dirty):
        with pytest.raises(ValueError):
            len(v)
    with pytest.raises(ValueError):
        ram.ctl.seed


def test_close_refuses_while_caller_views_live(make_ram):
    ram = make_ram("pin")
    view = ram.page_view(0, 1)
    with pytest.raises(SegmentError, match="still alive"):
        ram.close()
    view[0] = 1  # the mapping is still valid for the holder of the view
    view.release()
    ram.close()  # idempotent after the failed close


def test_page_view_bounds(make_ram):
    ram = make_ram("pv", 16 * PAGE_SIZE)
    with ram.page_view(15, 1) as v:
        assert len(v) == PAGE_SIZE
    with ram.page_view(16, 0) as v:
        assert len(v) == 0
    for first, count in [(-1, 1), (15, 2), (0, 17), (3, -1)]:
        with pytest.raises(ValueError):
            ram.page_view(first, count)


def test_unlink_and_helpers(make_ram, shm_prefix):
    a = make_ram("l1")
    b = make_ram("l2")
    assert list_segments(shm_prefix) == [a.name, b.name]
    a.unlink()
    a.unlink()
    assert not segment_exists(a.name)
    a.ram[0] = 1  # still mapped
    assert unlink_segment(b.name) is True
    assert unlink_segment(b.name) is False
    assert list_segments(shm_prefix) == []


def _mapping_rss_bytes(path):
    """Rss of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                inside = line.rstrip("\n").endswith(path)
            elif inside and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.parametrize("fallback", [False, True], ids=["madvise", "fallocate+touch"])
def test_prefault_makes_ram_resident(make_ram, monkeypatch, fallback):
    if fallback:
        def no_populate(mm, start, length):
            raise OSError(22, "Invalid argument")

        monkeypatch.setattr(segment_mod, "_populate_write", no_populate)
    size = 64 << 20
    ram = make_ram("pf", size)
    ram.ram[PAGE_SIZE * 100 : PAGE_SIZE * 100 + 4] = b"keep"
    ram.ram[-1] = 0x5A
    assert os.fstat(ram.fd).st_blocks * 512 < ram.ram_offset + 2 * PAGE_SIZE + 1
    assert _mapping_rss_bytes(ram.path) < size // 2
    t0 = time.perf_counter()
    ram.prefault()
    elapsed = time.perf_counter() - t0
    assert os.fstat(ram.fd).st_blocks * 512 >= size
    assert _mapping_rss_bytes(ram.path) >= size
    # contents survive (the fallback rewrites one byte per page with itself)
    assert bytes(ram.ram[PAGE_SIZE * 100 : PAGE_SIZE * 100 + 4]) == b"keep"
    assert ram.ram[-1] == 0x5A
    assert elapsed < 5  # ~0.1-0.2 s per GiB expected; this only catches pathologies


def test_mmap_module_constant_still_missing_or_equal():
    # MADV_POPULATE_WRITE is hard-coded because 3.11 does not export it.
    assert getattr(mmap, "MADV_POPULATE_WRITE", segment_mod.MADV_POPULATE_WRITE) == 23


def test_next_data_page_finds_holes_without_touching_them(make_ram):
    ram = make_ram("holes", 1 << 20)          # 256 pages, all holes
    assert ram.next_data_page(0) == ram.npages
    ram.ram[10 * PAGE_SIZE] = 1
    ram.ram[200 * PAGE_SIZE + 5] = 7
    assert ram.next_data_page(0) == 10
    assert ram.next_data_page(10) == 10
    assert ram.next_data_page(11) == 200
    assert ram.next_data_page(201) == ram.npages
    assert ram.next_data_page(ram.npages) == ram.npages
    blocks = os.fstat(ram.fd).st_blocks
    ram.next_data_page(0)
    assert os.fstat(ram.fd).st_blocks == blocks   # asking allocated nothing
    with pytest.raises(ValueError):
        ram.next_data_page(ram.npages + 1)


def test_chunk_digests_skip_holes_and_agree(make_ram):
    from memstore import chunk_digests

    ram = make_ram("dig-holes", 1 << 20)
    ram.ram[70 * PAGE_SIZE] = 3               # chunk 4 of the 16-page chunks holds data
    blocks = os.fstat(ram.fd).st_blocks
    fast = chunk_digests(ram.ram, 16, ram.next_data_page)
    # only the data chunk was read (reading allocates its 15 holes); the other 15 chunks were not
    assert (os.fstat(ram.fd).st_blocks - blocks) * 512 <= 15 * PAGE_SIZE
    assert fast == chunk_digests(ram.ram, 16)     # same answer as reading everything


def test_next_hole_page_and_extent_digests_agree(make_ram):
    from memstore import chunk_digests

    ram = make_ram("extents", 1 << 20)                 # 256 pages
    assert ram.next_hole_page(0) == 0
    ram.ram[10 * PAGE_SIZE:40 * PAGE_SIZE] = b"\x05" * (30 * PAGE_SIZE)
    ram.ram[200 * PAGE_SIZE] = 9
    assert ram.next_hole_page(10) == 40
    assert ram.next_hole_page(200) == 201
    assert ram.next_hole_page(ram.npages) == ram.npages
    both = chunk_digests(ram.ram, 4, ram.next_data_page, ram.next_hole_page)
    assert both == chunk_digests(ram.ram, 4, ram.next_data_page) == chunk_digests(ram.ram, 4)
