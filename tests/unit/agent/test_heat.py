from hypothesis import given
from hypothesis import strategies as st

from agent.migration.heat import ChunkHeat


def test_hot_chunks_go_last():
    h = ChunkHeat(npages=8 * 1024)
    h.update([(0, 1024), (2048, 10)])          # chunk 0 very hot, chunk 2 warm
    h.update([(0, 512), (5000, 1)])
    order = h.order()
    assert order[-1] == 0 and order[-2] == 2 and order[-3] == 4
    assert order[:5] == [1, 3, 5, 6, 7]         # never written: address order


def test_decay_lets_old_heat_fade():
    h = ChunkHeat(npages=2048)
    h.update([(0, 1024)])
    for _ in range(20):
        h.update([(1024, 8)])
    assert h.order() == [0, 1]


@given(st.lists(st.tuples(st.integers(0, 9999), st.integers(1, 3000)), max_size=30))
def test_runs_spanning_chunks_are_counted_exactly(runs):
    npages = 16 * 1024
    runs = [(f, min(c, npages - f)) for f, c in runs if f < npages]
    h = ChunkHeat(npages)
    h.update(runs)
    assert sum(h.heat) == sum(c for _, c in runs)
    assert sorted(h.order()) == list(range(h.nchunks))
