"""Two failure-path details found in review (issue 12):

- the handshake gate's choice of whom to evict (endpoint.HandshakeGate._victim);
- a round's acker that ended with an error that is neither an AgentError nor a
  ProtocolError (a full /dev/shm: SegmentError) must not stop the
  destination's cleanup (DestinationMigration._stop_acker).
"""
from __future__ import annotations

import asyncio
import time

import pytest

from memstore import SegmentError
from agent.migration.destination import DestinationMigration
from agent.net.endpoint import EVICT_GRACE_S, HandshakeGate, _Handshake

pytestmark = pytest.mark.timeout(30)


def _gate_with(entries) -> HandshakeGate:
    """entries: (name, authed, age_s), oldest first."""
    async def make():
        gate = HandshakeGate(max_handshakes=len(entries), timeout_s=60, max_established=4,
                             max_body_after_auth=1 << 20, tls=True)
        now = time.monotonic()
        for name, authed, age in entries:
            h = _Handshake(gate, None, name)
            h.authed, h.t0 = authed, now - age
            gate.pending[id(h)] = h
        return gate
    return asyncio.run(make())


@pytest.mark.parametrize("entries, victim", [
    # an old unauthenticated connection goes first
    ([("tls-done", True, 0.1), ("idle", False, EVICT_GRACE_S + 1)], "idle"),
    # an authenticated trickler before the young TLS handshake of a migration's data stream
    ([("trickler", True, EVICT_GRACE_S + 5), ("stream-1", False, 0.01)], "trickler"),
    # a flood of young unauthenticated connections evicts itself, not a peer that just finished TLS
    ([("peer", True, 0.1), ("flood-1", False, 0.05), ("flood-2", False, 0.01)], "flood-1"),
    # nothing else: the oldest of all
    ([("a", True, 0.2), ("b", True, 0.1)], "a"),
])
def test_whom_a_full_gate_evicts(entries, victim):
    assert _gate_with(entries)._victim().peer == victim


def test_an_acker_that_failed_with_a_segment_error_does_not_stop_the_cleanup():
    async def main():
        d = DestinationMigration(host=None, conn=None)

        async def acker():
            raise SegmentError("cannot reserve RAM: needs 4.0 MiB in /dev/shm, 0 B free")
        d._acker = asyncio.ensure_future(acker())
        await asyncio.wait([d._acker])   # it has failed
        await d._stop_acker()            # must not raise
        assert d._acker is None
    asyncio.run(main())
