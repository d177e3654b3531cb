import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memstore.layout import PAGE_SIZE, PageRun
from memstore.scan import is_zero, split_zero


def ram_with(npages, data_pages, offset=0):
    buf = bytearray(npages * PAGE_SIZE)
    for p in data_pages:
        buf[p * PAGE_SIZE + offset] = 0x7F
    return memoryview(buf)


def test_split_zero_docstring_example():
    ram = ram_with(200, [120, 127])
    data, zero = split_zero(ram, PageRun(100, 40), 16)
    assert data == [PageRun(116, 16)]
    assert zero == [PageRun(100, 16), PageRun(132, 8)]


def test_split_zero_mixed_runs_merge():
    # granules of 4 pages over pages [0, 32): z z d d z d z(short)
    ram = ram_with(32, [8, 15, 20])
    data, zero = split_zero(ram, PageRun(0, 30), 4)
    assert data == [PageRun(8, 8), PageRun(20, 4)]
    assert zero == [PageRun(0, 8), PageRun(16, 4), PageRun(24, 6)]


def test_one_byte_at_page_end_makes_data():
    ram = ram_with(16, [15], offset=PAGE_SIZE - 1)
    assert split_zero(ram, PageRun(0, 16)) == ([PageRun(0, 16)], [])
    assert split_zero(ram, PageRun(0, 15), 1) == ([], [PageRun(0, 15)])
    assert split_zero(ram, PageRun(15, 1), 1) == ([PageRun(15, 1)], [])


def test_all_zero_all_data_and_empty():
    zero_ram = ram_with(64, [])
    assert split_zero(zero_ram, PageRun(3, 50)) == ([], [PageRun(3, 50)])
    data_ram = ram_with(64, range(64))
    assert split_zero(data_ram, PageRun(3, 50)) == ([PageRun(3, 50)], [])
    assert split_zero(data_ram, PageRun(10, 0)) == ([], [])


def test_bad_arguments():
    ram = ram_with(8, [])
    with pytest.raises(ValueError):
        split_zero(ram, PageRun(4, 5))
    with pytest.raises(ValueError):
        split_zero(ram, PageRun(-1, 2))
    with pytest.raises(ValueError):
        split_zero(ram, PageRun(0, 2), 0)


def test_is_zero():
    assert is_zero(bytes(3 * PAGE_SIZE))
    assert not is_zero(bytes(PAGE_SIZE - 1) + b"\x01")


@st.composite
def layouts(draw):
    npages = draw(st.integers(1, 48))
    data = draw(st.sets(st.integers(0, npages - 1)))
    offsets = draw(st.integers(0, PAGE_SIZE - 1))
    first = draw(st.integers(0, npages - 1))
    count = draw(st.integers(0, npages - first))
    granule = draw(st.integers(1, 9))
    return npages, data, offsets, PageRun(first, count), granule


@given(layouts())
@settings(max_examples=300, deadline=None)
def test_split_zero_covers_run_exactly(layout):
    npages, data_pages, offset, run, granule = layout
    ram = ram_with(npages, data_pages, offset)
    data, zero = split_zero(ram, run, granule)
    tagged = sorted([(r, "d") for r in data] + [(r, "z") for r in zero])
    # exact, ordered coverage of the run
    pos = run.first
    for r, _ in tagged:
        assert r.first == pos and r.count > 0
        pos = r.end
    assert pos == run.end
    assert data == sorted(data) and zero == sorted(zero)
    # neighbours alternate kinds (same-kind neighbours would have been merged)
    assert all(a[1] != b[1] for a, b in zip(tagged, tagged[1:]))
    # classification matches a byte-exact reference per granule
    for g in range(run.first, run.end, granule):
        g_end = min(g + granule, run.end)
        expect_zero = not any(p in data_pages for p in range(g, g_end))
        kind = next(k for r, k in tagged if r.first <= g < r.end)
        assert kind == ("z" if expect_zero else "d")
        assert next(k for r, k in tagged if r.first <= g_end - 1 < r.end) == kind
