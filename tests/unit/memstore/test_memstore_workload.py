import pytest

from memstore.errors import WorkloadError
from memstore.workload import (
    MAX_IO_WPS,
    MAX_RATE_PPS,
    Workload,
    disk_write_for,
    io_ws_blocks,
    page_for_write,
    parse_workload,
    splitmix64,
    validate_for,
)


@pytest.mark.parametrize(
    "spec, kind, rate, ws",
    [
        ("idle", "idle", 0, None),
        ("  idle ", "idle", 0, None),
        ("uniform:rate=20000", "uniform", 20000, None),
        ("uniform:rate=0", "uniform", 0, None),
        ("sequential:rate=5", "sequential", 5, None),
        ("hotset:ws=64M,rate=20000", "hotset", 20000, 64 << 20),
        ("hotset:rate=1,ws=4096", "hotset", 1, 4096),
        ("hotset:ws=1GiB,rate=7", "hotset", 7, 1 << 30),
        (f"uniform:rate={MAX_RATE_PPS}", "uniform", MAX_RATE_PPS, None),
    ],
)
def test_parse_good(spec, kind, rate, ws):
    wl = parse_workload(spec)
    assert (wl.kind, wl.rate_pps, wl.ws_bytes) == (kind, rate, ws)
    assert wl.spec == spec.strip()
    assert parse_workload(wl.spec) == wl


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("", "unknown workload kind"),
        ("zipf:rate=1", "unknown workload kind"),
        ("Uniform:rate=1", "unknown workload kind"),
        ("idle:rate=5", "unknown parameter 'rate' for workload 'idle'"),
        ("idle:", "bad workload"),
        ("uniform:rate=1,io=-1", "io must be a non-negative integer"),
        ("uniform:rate=1,io=1k", "io must be a non-negative integer"),
        (f"uniform:rate=1,io={MAX_IO_WPS + 1}", "exceeds the limit"),
        ("uniform:rate=1,io=5,iows=4096", "multiple of 65536"),
        ("uniform:rate=1,io=5,iows=0", "multiple of 65536"),
        ("uniform:rate=1,iows=1.5G", "bad disk working-set size"),
        ("uniform:rate=1,io=1,io=2", "given twice"),
        ("idle:io=1,speed=2", "unknown parameter 'speed'"),
        ("uniform", "needs rate"),
        ("uniform:", "needs rate"),
        ("uniform:rate=", "bad parameter"),
        ("uniform:rate", "bad parameter"),
        ("uniform:=5", "bad parameter"),
        ("uniform:rate=20k", "non-negative integer"),
        ("uniform:rate=-1", "non-negative integer"),
        ("uniform:rate=1.5", "non-negative integer"),
        ("uniform:rate= 5", "non-negative integer"),
        (f"uniform:rate={MAX_RATE_PPS + 1}", "exceeds"),
        ("uniform:rate=1,rate=2", "given twice"),
        ("uniform:rate=1,ws=4096", "unknown parameter 'ws'"),
        ("uniform:rate=1,", "bad parameter"),
        ("hotset:rate=1", "needs ws"),
        ("hotset:ws=64M", "needs rate"),
        ("hotset:ws=1000,rate=1", "multiple of 4096"),
        ("hotset:ws=0,rate=1", "multiple of 4096"),
        ("hotset:ws=1.5G,rate=1", "bad hot-set size"),
        ("hotset:ws=64MB,rate=1", "ambiguous"),
        ("sequential:rate=1,speed=2", "unknown parameter 'speed'"),
        ("uniform:rate=" + "1" * 600, "longer than 512"),
    ],
)
def test_parse_bad(spec, msg):
    with pytest.raises(WorkloadError, match=msg):
        parse_workload(spec)


def test_parse_rejects_non_str():
    with pytest.raises(WorkloadError):
        parse_workload(None)


def test_validate_for():
    validate_for(parse_workload("hotset:ws=1M,rate=1"), 1 << 20)
    validate_for(parse_workload("idle"), 4096)
    with pytest.raises(WorkloadError, match="does not fit"):
        validate_for(parse_workload("hotset:ws=2M,rate=1"), 1 << 20)
    with pytest.raises(WorkloadError, match="positive multiple"):
        validate_for(parse_workload("idle"), 100)


def test_splitmix64_reference_values():
    # Reference: SplitMix64 generator seeded with 0 yields splitmix64(k * golden) ...
    # first outputs of the canonical generator (state starts at 0, adds golden first).
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    assert all(0 <= splitmix64(x) < 1 << 64 for x in (0, 1, (1 << 64) - 1))


def test_page_for_write_kinds():
    npages = 1000
    uni = parse_workload("uniform:rate=1")
    hot = parse_workload("hotset:ws=40K,rate=1")  # 10 pages
    seq = parse_workload("sequential:rate=1")
    pages = [page_for_write(uni, npages, 7, c, 3)[0] for c in range(1, 5001)]
    assert all(0 <= p < npages for p in pages)
    assert len(set(pages)) > 900  # spread over (nearly) all pages
    assert page_for_write(uni, npages, 7, 11, 3) == page_for_write(uni, npages, 7, 11, 3)
    assert page_for_write(uni, npages, 7, 11, 3)[1] == 3
    hot_pages = {page_for_write(hot, npages, 7, c, 0)[0] for c in range(1, 1001)}
    assert hot_pages == set(range(10))
    cursor, seen = 998, []
    for c in range(1, 5):
        page, cursor = page_for_write(seq, npages, 7, c, cursor)
        seen.append(page)
    assert seen == [998, 999, 0, 1] and cursor == 2
    with pytest.raises(WorkloadError):
        page_for_write(parse_workload("idle"), npages, 7, 1, 0)


def test_workload_is_frozen():
    wl = Workload(kind="idle", rate_pps=0, ws_bytes=None, spec="idle")
    with pytest.raises(AttributeError):
        wl.rate_pps = 5


@pytest.mark.parametrize(
    "spec, kind, rate, io, iows",
    [
        ("hotset:ws=64M,rate=20000,io=2000,iows=256M", "hotset", 20000, 2000, 256 << 20),
        ("uniform:io=7,rate=3", "uniform", 3, 7, None),
        ("idle:io=100", "idle", 0, 100, None),
        ("idle:iows=64K,io=1", "idle", 0, 1, 64 << 10),
        ("sequential:rate=1", "sequential", 1, 0, None),
        (f"uniform:rate=0,io={MAX_IO_WPS}", "uniform", 0, MAX_IO_WPS, None),
    ],
)
def test_parse_disk_io(spec, kind, rate, io, iows):
    wl = parse_workload(spec)
    assert (wl.kind, wl.rate_pps, wl.io_wps, wl.io_ws_bytes) == (kind, rate, io, iows)
    assert parse_workload(wl.spec) == wl


def test_validate_for_disks():
    wl = parse_workload("uniform:rate=1,io=10,iows=1M")
    validate_for(wl, 1 << 20)                       # disks unknown: RAM only
    validate_for(wl, 1 << 20, [1 << 20, 4 << 20])
    with pytest.raises(WorkloadError, match="needs a disk"):
        validate_for(wl, 1 << 20, [])
    with pytest.raises(WorkloadError, match="does not fit disk 1"):
        validate_for(wl, 1 << 20, [4 << 20, 512 << 10])
    validate_for(parse_workload("uniform:rate=1"), 1 << 20, [])   # no io, no disk: fine
    validate_for(parse_workload("idle:io=1"), 4096, [64 << 10])   # whole disk


def test_disk_write_for_spreads_and_continues():
    uni = parse_workload("uniform:rate=1,io=1,iows=1M")
    ws = io_ws_blocks(uni, [(4 << 20, 64 << 10), (512 << 10, 64 << 10)])
    assert ws == [16, 8]     # iows caps disk 0; disk 1 is smaller than iows: whole disk
    picks = [disk_write_for(uni, ws, 9, k, 5) for k in range(1, 3001)]
    assert all(c == 5 for _, _, c in picks)       # random kinds leave the cursor alone
    per_disk = [sum(1 for d, _, _ in picks if d == i) for i in (0, 1)]
    assert 1800 < per_disk[0] < 2200 and 800 < per_disk[1] < 1200   # 2:1, as the working sets
    assert {(d, b) for d, b, _ in picks} == {(0, b) for b in range(16)} | {(1, b) for b in range(8)}
    assert disk_write_for(uni, ws, 9, 77, 0) == disk_write_for(uni, ws, 9, 77, 0)
    assert disk_write_for(uni, ws, 9, 77, 0) != disk_write_for(uni, ws, 10, 77, 0) or \
        disk_write_for(uni, ws, 9, 78, 0) != disk_write_for(uni, ws, 10, 78, 0)
    seq = parse_workload("sequential:rate=1,io=1")
    cursor, seen = 22, []
    for k in range(1, 5):
        d, b, cursor = disk_write_for(seq, ws, 9, k, cursor)
        seen.append((d, b))
    assert seen == [(1, 6), (1, 7), (0, 0), (0, 1)] and cursor == 2
    with pytest.raises(WorkloadError):
        disk_write_for(uni, [], 9, 1, 0)
