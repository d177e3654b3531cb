"""Write frequency per 4 MiB chunk, so the first pass sends cold memory first.

While no migration owns a VM's dirty map, the agent collects it once per
HEAT_PERIOD_S and adds the pages each chunk had written to a decaying
counter (half-life one period). The full pass of a migration then walks
chunks from coldest to hottest: hot chunks go last, so fewer of them are
dirtied again before the first pass ends (cf. the "cold first" ordering of
Clark et al. and of Hyper-V's first pass). Cost: one collect per VM per
period (a C-speed scan of the map) and one Python step per dirty run.
"""
from __future__ import annotations

HEAT_CHUNK_PAGES = 1024
HEAT_PERIOD_S = 1.0
DECAY = 0.5


class ChunkHeat:
    def __init__(self, npages: int, chunk_pages: int = HEAT_CHUNK_PAGES) -> None:
        self.chunk_pages = chunk_pages
        self.nchunks = (npages + chunk_pages - 1) // chunk_pages
        self.heat = [0.0] * self.nchunks
        self.samples = 0

    def update(self, runs) -> None:
        """Account one period's dirty runs (first, count)."""
        heat = self.heat
        for i in range(self.nchunks):
            heat[i] *= DECAY
        cp = self.chunk_pages
        for first, count in runs:
            end = first + count
            c = first // cp
            while first < end:
                stop = min(end, (c + 1) * cp)
                heat[c] += stop - first
                first, c = stop, c + 1
        self.samples += 1

    def order(self) -> list[int]:
        """Chunk indexes, coldest first (ties in address order)."""
        heat = self.heat
        return sorted(range(self.nchunks), key=lambda c: (heat[c], c))
