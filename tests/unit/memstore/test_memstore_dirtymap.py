import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memstore.dirtymap import DirtyMap, runs_from_snapshot
from memstore.layout import PageRun


def make(marks, n=32):
    buf = bytearray(n)
    for p in marks:
        buf[p] = 1
    return buf, DirtyMap(memoryview(buf))


@pytest.mark.parametrize(
    "snap, runs",
    [
        (b"", []),
        (bytes(8), []),
        (b"\x01" * 8, [PageRun(0, 8)]),
        (b"\x01\x00\x01\x01\x00\x00\x01", [PageRun(0, 1), PageRun(2, 2), PageRun(6, 1)]),
        (b"\x00\xff\x02\x00", [PageRun(1, 2)]),  # any non-zero byte counts as marked
        (b"\x00\x00\x00\x01", [PageRun(3, 1)]),
    ],
)
def test_runs_from_snapshot(snap, runs):
    assert runs_from_snapshot(snap) == runs


def test_collect_clears_only_what_it_returns():
    buf, dm = make([0, 1, 2, 7, 31])
    assert dm.npages == 32 and dm.count() == 5
    assert dm.collect() == [PageRun(0, 3), PageRun(7, 1), PageRun(31, 1)]
    assert dm.count() == 0 and buf == bytearray(32)
    assert dm.collect() == []
    dm.mark(4)
    assert dm.is_marked(4) and dm.collect() == [PageRun(4, 1)]
    with pytest.raises(ValueError):
        dm.mark(32)


def test_clear_runs_leaves_other_bytes():
    buf, dm = make([1, 2, 3, 10])
    dm.clear_runs([PageRun(1, 3)])
    assert dm.snapshot() == bytes(10) + b"\x01" + bytes(21)


def test_clear_all():
    buf, dm = make(range(0, 32, 3))
    dm.clear_all()
    assert dm.count() == 0


def test_needs_writable_byte_view():
    with pytest.raises(ValueError):
        DirtyMap(memoryview(bytes(8)))
    with pytest.raises(ValueError):
        DirtyMap(memoryview(bytearray(16)).cast("Q"))


# --- every interleaving of guest write/mark with snapshot/clear/read ---------

def interleavings(a, b):
    """All merges of sequences a and b that keep each one's order."""
    n = len(a) + len(b)
    for pos in itertools.combinations(range(n), len(a)):
        out, ia, ib = [], iter(a), iter(b)
        for i in range(n):
            out.append(next(ia) if i in pos else next(ib))
        yield out


def run_schedule(schedule, initially_marked, bulk_clear):
    """Execute one schedule on a 2-page VM. Returns True if a write was lost:
    after everything, page 0 differs from the last copy the collector read and
    is not marked. Guest steps: ("W", v) writes value v to page 0, ("M",)
    marks it. Collector steps: S snapshot, C clear, R read."""
    ram = bytearray(2)
    dirty = bytearray(2)
    dm = DirtyMap(memoryview(dirty))
    sent = ram[0]  # the destination holds page 0 as it was at the start
    if initially_marked:
        dirty[0] = 1
    snap = runs = None
    for step in schedule:
        if step[0] == "W":
            ram[0] = step[1]
        elif step[0] == "M":
            dirty[0] = 1
        elif step[0] == "S":
            snap = dm.snapshot()
            runs = runs_from_snapshot(snap)
        elif step[0] == "C":
            dm.clear_all() if bulk_clear else dm.clear_runs(runs)
        elif step[0] == "R":
            if any(r.first <= 0 < r.end for r in runs):
                sent = ram[0]
    return ram[0] != sent and not dirty[0]


GUEST_ONE = [("W", 1), ("M",)]
GUEST_TWO = [("W", 1), ("M",), ("W", 2), ("M",)]
COLLECTOR = [("S",), ("C",), ("R",)]


@pytest.mark.parametrize("guest", [GUEST_ONE, GUEST_TWO], ids=["one-write", "two-writes"])
@pytest.mark.parametrize("initially_marked", [False, True])
def test_clear_seen_marks_never_loses_a_write(guest, initially_marked):
    schedules = list(interleavings(guest, COLLECTOR))
    assert len(schedules) == (10 if guest is GUEST_ONE else 35)
    for schedule in schedules:
        assert not run_schedule(schedule, initially_marked, bulk_clear=False), schedule


def test_bulk_clear_after_snapshot_loses_a_write():
    lost = [s for s in interleavings(GUEST_ONE, COLLECTOR)
            if run_schedule(s, initially_marked=False, bulk_clear=True)]
    # the write and its mark landed between snapshot and clear
    assert [("S",), ("W", 1), ("M",), ("C",), ("R",)] in lost


# --- DirtyMap against a set() model -----------------------------------------

NPAGES = 64


class DirtyMapMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.buf = bytearray(NPAGES)
        self.dm = DirtyMap(memoryview(self.buf))
        self.model: set[int] = set()

    @rule(page=st.integers(0, NPAGES - 1))
    def mark(self, page):
        self.dm.mark(page)
        self.model.add(page)

    @rule(first=st.integers(0, NPAGES - 1), count=st.integers(1, 16), value=st.integers(1, 255))
    def guest_marks_run(self, first, count, value):
        end = min(first + count, NPAGES)
        self.buf[first:end] = bytes([value]) * (end - first)
        self.model.update(range(first, end))

    @rule()
    def collect(self):
        runs = self.dm.collect()
        pages = [p for r in runs for p in range(r.first, r.end)]
        assert pages == sorted(self.model)
        for a, b in zip(runs, runs[1:]):
            assert a.end < b.first  # maximal: runs never touch
        assert all(r.count > 0 for r in runs)
        self.model.clear()

    @precondition(lambda self: self.model)
    @rule()
    def clear_all(self):
        self.dm.clear_all()
        self.model.clear()

    @invariant()
    def count_matches(self):
        assert self.dm.count() == len(self.model)
        assert {i for i, v in enumerate(self.dm.snapshot()) if v} == self.model


TestDirtyMapMachine = DirtyMapMachine.TestCase
TestDirtyMapMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_runs_cover_exactly_the_nonzero_bytes(snap):
    runs = runs_from_snapshot(snap)
    covered = {p for r in runs for p in range(r.first, r.end)}
    assert covered == {i for i, v in enumerate(snap) if v}
    assert all(a.end < b.first for a, b in zip(runs, runs[1:]))
