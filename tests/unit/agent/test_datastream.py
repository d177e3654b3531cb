"""Data streams (agent/net/datastream.py): the pages of a migration on
connections of their own, each served by a thread.

Everything here runs for real: TCP over 127.0.0.1, the threads of
``_Sender``/``_Receiver``, the production ``FrameDecoder`` and
``MigrationSession``, an anonymous ``mmap`` as guest memory (closing it
proves no view of it is left: ``mmap.close`` raises BufferError while one
is alive).

- ``split_runs``/``stream_of``: the ordering guarantee, as a property.
- The destination (``InboundStreams``, created in a running loop, streams
  admitted after a real ``accept_data_stream``): payloads land where their
  runs say, every read ends exactly at the current piece (prefix, body, the
  run's slice of guest memory, or one bounce buffer for many small runs),
  zero batches are applied in stream order, RoundEnd advances ``reached``,
  EOF at a frame boundary is a clean end, every kind of bad input fails the
  migration once (on_failure) and ends the thread, ``close`` joins a thread
  blocked in recv.
- The source (``OutboundStreams.open`` against a small listener that runs
  ``accept_data_stream``): batches arrive complete and in order per stream,
  QUEUE_BYTES backpressure, a reset stream fails the migration once,
  ``close`` releases every view of the source memory.
- ``accept_data_stream``: what it takes and what it refuses.

Waits are on events, thread joins or conditions, each with a deadline (the
one condition only a sender thread's progress makes true, its queue
filling up, is polled); the few short timeouts are the thing under test (a
peer that never sends, a finish that cannot end in time).

Three tests were written against bugs this file found in datastream.py
(views of the source memory kept by a failure's traceback, a timed-out
finish that reported success, a SegmentError turned into PeerLost before
on_failure saw it); the constants before those tests say what each guards.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import random
import socket
import struct
import threading

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    DATA_STREAM_MAGIC,
    PAGE_SIZE,
    PREFIX_SIZE,
    Abort,
    BatchFlags,
    ErrorCode,
    Join,
    MigrationSession,
    MsgType,
    PageBatch,
    ProtocolError,
    RemoteProtocolError,
    Role,
    RoundEnd,
    StateTransfer,
    encode_frame,
)
from protocol.framing import CLOSED, NEED_DATA, PREFIX, FrameDecoder, Payload

from agent.errors import PeerError, PeerLost
from agent.net.datastream import (
    JOIN_MAX_BODY,
    QUEUE_BYTES,
    SCATTER_AVG_BYTES,
    SCATTER_MIN_RUNS,
    STREAM_CHUNK_PAGES,
    InboundStreams,
    OutboundStreams,
    accept_data_stream,
    split_runs,
    stream_of,
)
from tests.unit.protocol.conftest import make_examples

pytestmark = pytest.mark.timeout(60)

PAGE = PAGE_SIZE
MID = "mig-ds-0001"
NPAGES = 256                     # destination memory of the receiver tests (1 MiB)
EXAMPLES = make_examples(MID)


# ============================================================================ helpers

def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(accepted end, connecting end) of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        client = socket.create_connection(lsock.getsockname()[:2], timeout=10)
        server, _ = lsock.accept()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server, client


def read_all_frames(sock: socket.socket, first_only: bool = False) -> list:
    """What the peer sends until EOF (or its first frame), blocking, the
    socket has a timeout; a reset counts as EOF."""
    dec = FrameDecoder()
    out = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        dec.receive_data(chunk)
        while True:
            try:
                ev = dec.next_event()
            except RemoteProtocolError:
                return out + ["TRUNCATED"]
            if ev is NEED_DATA:
                break
            out.append(ev)
            if ev is CLOSED or first_only:
                return out


class Guest:
    """Destination guest memory and the sink/apply callbacks of a section.
    ``events`` is the order in which the stream thread called them."""

    def __init__(self, npages: int = NPAGES) -> None:
        self.npages = npages
        self.mem = mmap.mmap(-1, npages * PAGE)
        self.view = memoryview(self.mem)
        self.events: list[tuple[str, PageBatch]] = []

    def sink(self, batch: PageBatch) -> list[memoryview]:          # stream thread
        for first, count in batch.runs:          # every run checked before a view exists, as ram.py
            if first + count > self.npages:
                raise RemoteProtocolError(f"pages {first}+{count} beyond {self.npages}", ErrorCode.MALFORMED)
        self.events.append(("sink", batch))
        return [self.view[f * PAGE:(f + c) * PAGE] for f, c in batch.runs]

    def apply(self, batch: PageBatch) -> None:                     # stream thread
        if not batch.flags & BatchFlags.ZERO:
            self.events.append(("landed", batch))                  # after its payload, before on_batch
            return
        for first, count in batch.runs:
            if first + count > self.npages:
                raise RemoteProtocolError("zero pages beyond the VM", ErrorCode.MALFORMED)
        self.events.append(("apply", batch))
        for f, c in batch.runs:
            self.view[f * PAGE:(f + c) * PAGE] = bytes(c * PAGE)

    def close(self) -> None:
        self.view.release()
        self.mem.close()                         # BufferError if a stream thread's view were still alive


def run_then_close(main, guest: "Guest") -> None:
    """asyncio.run(main()), then close the guest memory whatever happened:
    its close raises BufferError if a view a sink handed out is still alive,
    so every test also checks that no thread kept one."""
    try:
        asyncio.run(main())
    finally:
        guest.close()


class Harness:
    """A real InboundStreams (made inside the running loop) over a Guest,
    with its loop-side callbacks recorded."""

    def __init__(self, guest: Guest, n: int = 1, sink=None) -> None:
        self.guest = guest
        self.batches: list[PageBatch] = []        # on_batch, in the order the loop ran them
        self.failures: list[BaseException] = []
        self.failed = asyncio.Event()
        self.changed = asyncio.Event()
        self.streams = InboundStreams(MID, n, None, sink=sink or guest.sink, apply=guest.apply,
                                      check_batch=self.check_batch, on_batch=self.on_batch,
                                      on_failure=self.on_failure)

    @staticmethod
    def check_batch(batch: PageBatch) -> None:      # stream thread: only section 0 exists here
        if batch.section != 0:
            raise RemoteProtocolError(f"no section {batch.section}", ErrorCode.MALFORMED)

    def on_batch(self, batch: PageBatch) -> None:
        self.batches.append(batch)
        self.changed.set()

    def on_failure(self, exc: BaseException) -> None:
        self.failures.append(exc)
        self.failed.set()

    async def until_batches(self, n: int, timeout_s: float = 10) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.batches) < n:
                self.changed.clear()
                await self.changed.wait()

    async def ended(self, index: int = 0, timeout_s: float = 10) -> None:
        r = self.streams.receivers[index]
        await asyncio.to_thread(r.join, timeout_s)
        assert not r.is_alive(), "the stream thread did not end"


class Source:
    """The sending end of one data stream, as a source writes it: the magic,
    the Join, then frames from a SOURCE session (payload bytes after a batch)."""

    def __init__(self, sock: socket.socket, index: int, token: bytes) -> None:
        self.sock = sock
        self.session = MigrationSession(Role.SOURCE)
        sock.sendall(DATA_STREAM_MAGIC + self.session.send(Join(migration_id=MID, stream=index, token=token)))

    def frame(self, msg, payload: bytes = b"") -> bytes:
        return self.session.send(msg) + payload

    async def send(self, data: bytes) -> None:
        await asyncio.to_thread(self.sock.sendall, data)      # never blocks the loop the streams post to

    def eof(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    async def answers(self, first_only: bool = False) -> list:
        return await asyncio.to_thread(read_all_frames, self.sock, first_only)


class RecordingSock:
    """The accepted socket as the receiver thread sees it, recording every
    ``recv_into``: (stream offset, view length, bytes got, into guest memory?).
    ``caps`` limit each read (the socket happening to hold fewer bytes)."""

    def __init__(self, sock: socket.socket, guest: Guest, caps: list[int] | None = None) -> None:
        self._sock = sock
        self._guest = guest
        self._caps = caps
        self._i = 0
        self.pos = 0
        self.reads: list[tuple[int, int, int, bool]] = []
        self.cv = threading.Condition()
        self.waiting = False              # inside a recv_into

    def recv_into(self, buf, nbytes: int = 0) -> int:
        want = nbytes or len(buf)
        if self._caps:
            want = min(want, self._caps[self._i % len(self._caps)])
            self._i += 1
        with self.cv:
            self.waiting = True
            self.cv.notify_all()
        try:
            n = self._sock.recv_into(buf, want)
        finally:
            with self.cv:
                self.waiting = False
        into_guest = isinstance(buf, memoryview) and buf.obj is self._guest.mem
        with self.cv:
            self.reads.append((self.pos, len(buf), n, into_guest))
            self.pos += n
            self.cv.notify_all()
        return n

    def wait_blocked_at(self, pos: int, timeout_s: float = 10) -> None:
        """Until the thread sits in recv_into with ``pos`` stream bytes read."""
        with self.cv:
            assert self.cv.wait_for(lambda: self.pos == pos and self.waiting, timeout_s), (self.pos, self.waiting)

    def __getattr__(self, name):
        return getattr(self._sock, name)


async def join_stream(h: Harness, index: int = 0, wrap=None) -> Source:
    """A data stream from a Source, through accept_data_stream, admitted."""
    accepted, client = tcp_pair()
    src = Source(client, index, h.streams.token)
    sock, join, session, peer = await asyncio.to_thread(accept_data_stream, accepted, None, 5.0)
    assert join == Join(migration_id=MID, stream=index, token=h.streams.token) and peer is None
    assert h.streams.admit(join, wrap(sock) if wrap else sock, session, None) is None
    return src


def batch(runs, zero: bool = False, section: int = 0, round_: int = 1) -> PageBatch:
    pages = sum(c for _, c in runs)
    return PageBatch(section=section, round=round_, runs=tuple(runs),
                     flags=BatchFlags.ZERO if zero else BatchFlags.NONE, payload_len=0 if zero else pages * PAGE)


def payload_for(b: PageBatch, salt: int) -> bytes:
    return (bytes((salt * 37 + i) & 0xFF for i in range(251)) * (b.payload_len // 251 + 1))[: b.payload_len]


def scattered(b: PageBatch) -> bool:
    """The receiver's rule for its bounce buffer (many small runs)."""
    n = len(b.runs)
    return n > SCATTER_MIN_RUNS and b.payload_len <= SCATTER_AVG_BYTES * n


class Plan:
    """A stream's bytes after the Join, the guest memory they must leave, and
    the pieces every read must end at: (end offset, "frame" | "guest" | "bounce")."""

    def __init__(self, msgs: list, npages: int = NPAGES) -> None:
        self.data = bytearray()
        self.ram = bytearray(npages * PAGE)
        self.pieces: list[tuple[int, str]] = []
        session = MigrationSession(Role.SOURCE)
        session.send(Join(migration_id=MID, stream=0, token=bytes(16)))
        self.batches = []
        for i, msg in enumerate(msgs):
            start = len(self.data)
            self.data += session.send(msg)
            self.pieces += [(start + PREFIX_SIZE, "frame"), (len(self.data), "frame")]
            if isinstance(msg, PageBatch):
                self.batches.append(msg)
                if msg.payload_len:
                    payload = payload_for(msg, i)
                    base = len(self.data)
                    self.data += payload
                    off = 0
                    for first, count in msg.runs:
                        n = count * PAGE
                        self.ram[first * PAGE:first * PAGE + n] = payload[off:off + n]
                        off += n
                        if not scattered(msg):
                            self.pieces.append((base + off, "guest"))
                    if scattered(msg):
                        self.pieces.append((len(self.data), "bounce"))
                else:
                    for first, count in msg.runs:
                        self.ram[first * PAGE:(first + count) * PAGE] = bytes(count * PAGE)

    def check_reads(self, reads) -> None:
        for pos, asked, got, into_guest in reads:
            if got == 0:
                assert pos == len(self.data), "EOF only at the end"
                continue
            end, kind = next(p for p in self.pieces if p[0] > pos)
            assert pos + asked == end, f"a read at {pos} of {asked} bytes must end at the piece end {end}"
            assert into_guest == (kind == "guest"), f"read at {pos} ({kind}) into_guest={into_guest}"


# ============================================================================ split_runs / stream_of

runs_strategy = st.lists(st.tuples(st.integers(0, 6 * STREAM_CHUNK_PAGES), st.integers(1, 2600)), max_size=12)


@settings(max_examples=400, deadline=None)
@given(runs_strategy, st.integers(1, 8), st.integers(0, 3))
def test_split_runs_keeps_every_page_on_the_stream_of_its_chunk_in_order(runs, nstreams, section):
    out = split_runs(section, runs, nstreams)
    assert len(out) == nstreams
    pages_in = [p for f, c in runs for p in range(f, f + c)]
    for s, sruns in enumerate(out):
        assert all(c >= 1 for _, c in sruns)
        # exactly the input's pages of this stream, in input order (overlaps
        # and repeats included): coverage, placement and order at once
        assert [p for f, c in sruns for p in range(f, f + c)] == \
            [p for p in pages_in if stream_of(section, p, nstreams) == s]
        if nstreams > 1:
            for (f0, c0), (f1, _) in zip(sruns, sruns[1:]):
                assert f0 + c0 != f1, f"touching runs not merged on stream {s}: {sruns}"
    if nstreams == 1:
        assert out == [list(runs)]     # one stream: the runs as they are, not even cut


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**40), st.integers(1, 8), st.integers(0, 3), runs_strategy)
def test_a_page_maps_to_the_same_stream_whatever_run_it_came_in(page, nstreams, section, others):
    """The ordering guarantee: a page's stream depends on (section, page,
    nstreams) only, so a newer copy of it, in whatever run of whatever later
    batch, queues on the same TCP connection behind the older one."""
    s = stream_of(section, page, nstreams)
    assert 0 <= s < nstreams
    chunk0 = page - page % STREAM_CHUNK_PAGES
    assert stream_of(section, chunk0, nstreams) == s == stream_of(section, chunk0 + STREAM_CHUNK_PAGES - 1, nstreams)
    for first in (page, max(0, page - 5), chunk0):
        run = (first, page - first + 1 + 3)
        others_with = others + [run] + others
        where = {i for i, sruns in enumerate(split_runs(section, others_with, nstreams))
                 for f, c in sruns if f <= page < f + c}
        assert where == {s}


def test_stream_of_spreads_consecutive_chunks_round_robin():
    for n in range(1, 9):
        for section in range(4):
            got = [stream_of(section, c * STREAM_CHUNK_PAGES, n) for c in range(2 * n)]
            assert got == [(c + section) % n for c in range(2 * n)]


# ============================================================================ the destination

@st.composite
def stream_msgs(draw) -> list:
    msgs = []
    rnd = 1
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["direct", "scatter", "big-runs", "zero", "round-end"]))
        if kind == "round-end":
            msgs.append(RoundEnd(round=rnd, pages_sent=0, dirty_pages=0))
            rnd += 1
            continue
        nruns, counts = {"direct": ((1, SCATTER_MIN_RUNS), (1, 16)), "scatter": ((SCATTER_MIN_RUNS + 1, 12), (1, 4)),
                         "big-runs": ((SCATTER_MIN_RUNS + 1, 6), (17, 40)), "zero": ((1, 6), (1, 30))}[kind]
        runs = []
        for _ in range(draw(st.integers(*nruns))):
            c = draw(st.integers(*counts))
            runs.append((draw(st.integers(0, NPAGES - c)), c))
        msgs.append(batch(runs, zero=kind == "zero", round_=rnd))
    msgs.append(RoundEnd(round=rnd, pages_sent=0, dirty_pages=0))
    return msgs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream_msgs(), st.lists(st.integers(257, 3 * PAGE), min_size=1, max_size=8))   # 1-byte reads: below
def test_payloads_land_in_place_and_reads_never_cross_a_piece(msgs, caps):
    plan = Plan(msgs)
    guest = Guest()

    async def main() -> None:
        h = Harness(guest)
        rec: list[RecordingSock] = []
        src = await join_stream(h, wrap=lambda s: rec.append(RecordingSock(s, guest, caps)) or rec[0])
        await src.send(bytes(plan.data))
        src.eof()
        await h.streams.reached(msgs[-1].round, 10)
        await h.ended()
        r = h.streams.receivers[0]
        assert r.ended and h.failures == [] and h.streams.failure is None    # EOF at a frame boundary
        assert bytes(guest.mem) == bytes(plan.ram)
        plan.check_reads(rec[0].reads)
        assert rec[0].pos == len(plan.data) == r.bytes_received
        # the stream thread's calls (sink, then apply, for a payload; apply for a zero batch) and the
        # loop's on_batch both follow the stream's order
        calls = [(k, b) for k, b in guest.events if k != "landed"]
        assert [b for _, b in calls] == plan.batches
        assert [k for k, _ in calls] == ["apply" if b.flags & BatchFlags.ZERO else "sink" for b in plan.batches]
        # apply follows each payload once its bytes are in (in-thread digests), before the next batch
        want = [e for b in plan.batches for e in ([("apply", b)] if b.flags & BatchFlags.ZERO else [("sink", b), ("landed", b)])]
        assert guest.events == want
        assert h.batches == plan.batches
        await h.streams.close()
        src.sock.close()

    run_then_close(main, guest)


def test_one_byte_reads_and_a_newer_copy_behind_a_zero_batch():
    msgs = [
        batch([(1, 2)]),
        batch([(i, 1) for i in range(0, 20, 2)]),            # bounce buffer
        batch([(1, 1), (4, 1)], zero=True),                   # zeroes what came before it
        batch([(4, 1)], round_=2),                            # and a newer copy lands after it
        RoundEnd(round=2, pages_sent=0, dirty_pages=0),
    ]
    plan = Plan(msgs)
    guest = Guest()

    async def main() -> None:
        h = Harness(guest)
        rec: list[RecordingSock] = []
        src = await join_stream(h, wrap=lambda s: rec.append(RecordingSock(s, guest, [1])) or rec[0])
        await src.send(bytes(plan.data))
        await h.streams.reached(2, 10)
        assert bytes(guest.mem) == bytes(plan.ram)
        assert guest.mem[1 * PAGE:2 * PAGE] == bytes(PAGE) and guest.mem[4 * PAGE] != 0
        plan.check_reads(rec[0].reads)
        assert all(got == 1 for _, _, got, _ in rec[0].reads)
        await h.streams.close()
        src.sock.close()

    run_then_close(main, guest)


def test_round_end_advances_reached_once_every_stream_delivered_it():
    guest = Guest()

    async def main() -> None:
        h = Harness(guest, n=2)
        s0 = await join_stream(h, 0)
        assert not h.streams.reached_now(0)                   # stream 1 has not joined
        s1 = await join_stream(h, 1)
        assert h.streams.joined() == 2 and h.streams.reached_now(0)
        b0 = batch([(0, 3)])
        await s0.send(s0.frame(b0, payload_for(b0, 0)) + s0.frame(RoundEnd(round=1, pages_sent=3, dirty_pages=0))
                      + s0.frame(batch([(9, 1)], zero=True, round_=2)))
        await h.until_batches(2)          # the zero batch behind RoundEnd(1): stream 0's RoundEnd is counted
        assert h.streams.synced == [1, 0] and not h.streams.reached_now(1)
        await s1.send(s1.frame(RoundEnd(round=1, pages_sent=0, dirty_pages=0)))
        await h.streams.reached(1, 10)
        assert not h.streams.reached_now(2)
        for s in (s0, s1):
            await s.send(s.frame(RoundEnd(round=2, pages_sent=0, dirty_pages=0)))
        await h.streams.reached(2, 10)
        # a clean end: EOF at a frame boundary after the last RoundEnd
        for s in (s0, s1):
            s.eof()
        for i in (0, 1):
            await h.ended(i)
            assert h.streams.receivers[i].ended
        assert h.failures == [] and h.streams.failure is None
        await h.streams.reached(2, 10)
        assert guest.mem[:3 * PAGE] == payload_for(b0, 0)
        await h.streams.close()
        for s in (s0, s1):
            s.sock.close()

    run_then_close(main, guest)


def _body(msg: PageBatch, **override) -> bytes:
    fields = msg.to_body()
    fields.update(override)
    return msgpack.packb(fields, use_bin_type=True)


def _bad_input(case: str, src: Source) -> tuple[bytes, object]:
    """Bytes for one kind of bad input and the failure they must give:
    an ErrorCode (a RemoteProtocolError answered with Abort on the stream) or PeerLost."""
    ok = batch([(2, 2)])
    frame = src.frame(ok)
    pay = payload_for(ok, 1)
    if case == "truncated-prefix":
        return frame[:PREFIX_SIZE - 5], ErrorCode.TRUNCATED
    if case == "truncated-body":
        return frame[:-1], ErrorCode.TRUNCATED
    if case == "truncated-payload":
        return frame + pay[:PAGE + 100], PeerLost
    if case == "runs-do-not-match-the-payload":     # 2 pages of runs, 3 pages announced (prefix and body agree)
        body = _body(ok, payload_len=3 * PAGE)
        return PREFIX.pack(b"LMIG", MsgType.PAGE_BATCH, 0, len(body), 3 * PAGE) + body + pay + bytes(PAGE), \
            ErrorCode.MALFORMED
    if case == "prefix-and-body-disagree":
        body = _body(ok)
        return PREFIX.pack(b"LMIG", MsgType.PAGE_BATCH, 0, len(body), 3 * PAGE) + body + pay + bytes(PAGE), \
            ErrorCode.MALFORMED
    if case == "runs-beyond-memory":
        bad = batch([(0, 1), (NPAGES - 1, 2)])
        return src.frame(bad, payload_for(bad, 2)), ErrorCode.MALFORMED
    if case == "bad-section":
        bad = batch([(0, 2)], section=3)
        return src.frame(bad, payload_for(bad, 3)), ErrorCode.MALFORMED
    if case == "bad-section-zero-batch":
        return src.frame(batch([(0, 2)], zero=True, section=2)), ErrorCode.MALFORMED
    if case == "control-message":             # the source session would refuse it: hand-encoded
        return encode_frame(StateTransfer(vcpu_state=b"x", device_state=b"")), ErrorCode.UNEXPECTED
    if case == "bad-magic":
        return b"HTTP/1.1 200 OK\r\n\r\n", ErrorCode.BAD_MAGIC
    raise AssertionError(case)


BAD_INPUTS = ["truncated-prefix", "truncated-body", "truncated-payload", "runs-do-not-match-the-payload",
              "prefix-and-body-disagree", "runs-beyond-memory", "bad-section", "bad-section-zero-batch",
              "control-message", "bad-magic"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_the_migration_once_and_ends_the_thread(case):
    guest = Guest()

    async def main() -> None:
        h = Harness(guest)
        src = await join_stream(h)
        good = batch([(10, 1)])
        await src.send(src.frame(good, payload_for(good, 9)))
        await h.until_batches(1)
        guest.events.clear()
        data, expect = _bad_input(case, src)
        await src.send(data)
        if case.startswith("truncated"):
            src.eof()
        async with asyncio.timeout(10):
            await h.failed.wait()
        await h.ended()
        [exc] = h.failures
        assert h.streams.failure is exc
        if expect is PeerLost:
            assert isinstance(exc, PeerLost) and "mid-frame" in str(exc)
        else:
            assert isinstance(exc, RemoteProtocolError) and exc.code is expect, repr(exc)
        if case in ("runs-beyond-memory", "bad-section", "bad-section-zero-batch"):
            assert guest.events == []            # refused before a view of guest memory exists
        if case != "truncated-payload":         # (that one's first bytes did land: straight in guest memory)
            assert guest.mem[:10 * PAGE] == bytes(10 * PAGE)   # not a byte of the bad batch landed
        assert len(h.batches) == 1
        with pytest.raises(type(exc)):
            await h.streams.reached(1, 5)
        if isinstance(exc, ProtocolError):       # told on the stream, before on_failure
            [abort] = await src.answers(first_only=True)
            assert isinstance(abort, Abort) and abort.code is exc.code, abort
        await h.streams.close()
        if not isinstance(exc, ProtocolError):
            assert not any(isinstance(a, Abort) for a in await src.answers())
        assert h.failures == [exc]               # once
        src.sock.close()

    run_then_close(main, guest)


def test_a_sink_handing_out_the_wrong_size_is_malformed_and_its_views_are_released():
    guest = Guest()

    def short_sink(b: PageBatch):
        return guest.sink(b)[:-1]

    async def main() -> None:
        h = Harness(guest, sink=short_sink)
        src = await join_stream(h)
        b = batch([(0, 1), (3, 1)])
        await src.send(src.frame(b, payload_for(b, 1)))
        async with asyncio.timeout(10):
            await h.failed.wait()
        await h.ended()
        assert isinstance(h.failures[0], RemoteProtocolError) and "does not match" in str(h.failures[0])
        assert guest.mem[:4 * PAGE] == bytes(4 * PAGE)
        await h.streams.close()
        src.sock.close()

    run_then_close(main, guest)


def test_failures_on_two_streams_call_on_failure_once():
    guest = Guest()

    async def main() -> None:
        h = Harness(guest, n=2)
        s0 = await join_stream(h, 0)
        s1 = await join_stream(h, 1)
        await s0.send(s0.frame(batch([(0, 1)], section=1, zero=True)))
        async with asyncio.timeout(10):
            await h.failed.wait()
        await s1.send(b"garbage!" * 4)
        await h.ended(0)
        await h.ended(1)
        assert len(h.failures) == 1 and h.failures[0].code is ErrorCode.MALFORMED
        await h.streams.close()
        for s in (s0, s1):
            s.sock.close()

    run_then_close(main, guest)


def test_an_abort_from_the_source_fails_the_stream():
    guest = Guest()

    async def main() -> None:
        h = Harness(guest)
        src = await join_stream(h)
        await src.send(src.frame(Abort(code=ErrorCode.CANCELLED, reason="operator")))
        async with asyncio.timeout(10):
            await h.failed.wait()
        await h.ended()
        [exc] = h.failures
        assert isinstance(exc, PeerError) and exc.code == ErrorCode.CANCELLED and "operator" in str(exc)
        await h.streams.close()
        src.sock.close()

    run_then_close(main, guest)


@pytest.mark.parametrize("where", ["between-frames", "inside-a-payload"])
def test_close_joins_a_thread_blocked_in_recv(where):
    guest = Guest()

    async def main() -> None:
        h = Harness(guest)
        rec: list[RecordingSock] = []
        src = await join_stream(h, wrap=lambda s: rec.append(RecordingSock(s, guest)) or rec[0])
        b = batch([(0, 8)])
        data = src.frame(b, payload_for(b, 1))
        sent = len(data) - 2 * PAGE if where == "inside-a-payload" else len(data)
        await src.send(data[:sent])
        await asyncio.to_thread(rec[0].wait_blocked_at, sent)      # the thread sits in recv_into
        if where == "inside-a-payload":
            assert rec[0].reads[-1][3], "blocked in a read into guest memory"
        r = h.streams.receivers[0]
        async with asyncio.timeout(10):
            await h.streams.close()
        assert not r.is_alive()
        assert h.failures == [] and h.streams.failure is None      # a close is no failure
        assert r.sock.fileno() == -1
        src.sock.close()

    run_then_close(main, guest)


def test_admit_refuses_a_wrong_token_an_unexpected_stream_and_a_closed_migration():
    guest = Guest()

    async def main() -> None:
        h = Harness(guest, n=2)
        token = h.streams.token
        sess = MigrationSession(Role.DESTINATION)
        sess.receive(Join(migration_id=MID, stream=0, token=token))
        a, b = socket.socketpair()
        try:
            assert h.streams.admit(Join(migration_id=MID, stream=0, token=bytes(16)), a, sess, None) == "wrong token"
            assert "not expected" in h.streams.admit(Join(migration_id=MID, stream=2, token=token), a, sess, None)
            assert h.streams.joined() == 0
            src = await join_stream(h, 0)
            assert "joined already" in h.streams.admit(Join(migration_id=MID, stream=0, token=token), a, sess, None)
            pinned = InboundStreams(MID, 1, "agent-a", sink=guest.sink, apply=guest.apply,
                                    check_batch=Harness.check_batch, on_batch=lambda b: None,
                                    on_failure=lambda e: None)
            assert "certificate names 'agent-b'" in pinned.admit(
                Join(migration_id=MID, stream=0, token=pinned.token), a, sess, "agent-b")
            await h.streams.close()
            assert h.streams.admit(Join(migration_id=MID, stream=1, token=token), a, sess, None) \
                == "the migration is over"
            assert h.streams.joined() == 1
            src.sock.close()
        finally:
            a.close()
            b.close()

    run_then_close(main, guest)


# ============================================================================ accept_data_stream

@pytest.mark.parametrize("case", ["wrong-magic", "hello-instead-of-join", "body-too-large", "eof-before-join",
                                  "eof-inside-the-magic", "page-batch-instead-of-join", "silent"])
def test_accept_data_stream_refuses_and_closes(case):
    accepted, client = tcp_pair()
    try:
        src = MigrationSession(Role.SOURCE)
        hello = EXAMPLES[MsgType.HELLO]
        data = {
            "wrong-magic": b"LMDATA2\n" + encode_frame(Join(migration_id=MID, stream=0, token=bytes(16))),
            "hello-instead-of-join": DATA_STREAM_MAGIC + src.send(hello),
            "body-too-large": DATA_STREAM_MAGIC + PREFIX.pack(b"LMIG", MsgType.JOIN, 0, JOIN_MAX_BODY + 1, 0),
            "eof-before-join": DATA_STREAM_MAGIC,
            "eof-inside-the-magic": DATA_STREAM_MAGIC[:5],
            "page-batch-instead-of-join": DATA_STREAM_MAGIC + encode_frame(batch([(0, 1)])) + bytes(PAGE),
            "silent": b"",
        }[case]
        client.sendall(data)
        if case.startswith("eof"):
            client.shutdown(socket.SHUT_WR)
        expect = {"wrong-magic": (RemoteProtocolError, ErrorCode.BAD_MAGIC),
                  "hello-instead-of-join": (RemoteProtocolError, ErrorCode.UNEXPECTED),
                  "body-too-large": (RemoteProtocolError, ErrorCode.TOO_LARGE),
                  "page-batch-instead-of-join": (RemoteProtocolError, ErrorCode.UNEXPECTED),
                  "eof-before-join": (PeerLost, None), "eof-inside-the-magic": (PeerLost, None),
                  "silent": (TimeoutError, None)}[case]
        with pytest.raises(expect[0]) as exc:
            accept_data_stream(accepted, None, 0.3 if case == "silent" else 5.0)
        if expect[1] is not None:
            assert exc.value.code is expect[1]
        assert accepted.fileno() == -1                       # closed
        client.settimeout(5)
        assert read_all_frames(client) == [CLOSED]           # the peer sees EOF, nothing else
    finally:
        accepted.close()
        client.close()


def test_accept_data_stream_takes_the_magic_and_a_join_and_reads_nothing_more():
    accepted, client = tcp_pair()
    try:
        src = MigrationSession(Role.SOURCE)
        join = Join(migration_id=MID, stream=3, token=bytes(range(16)))
        after = src.send(join) + src.send(RoundEnd(round=1, pages_sent=0, dirty_pages=0))
        client.sendall(DATA_STREAM_MAGIC + after)
        sock, got, session, peer = accept_data_stream(accepted, None, 5.0)
        assert sock is accepted and got == join and peer is None
        assert session.migration_id == MID and session.role is Role.DESTINATION
        assert sock.gettimeout() is None                     # the migration's own deadlines apply from here
        sock.settimeout(5)
        rest = len(after) - len(encode_frame(join))
        assert sock.recv(rest, socket.MSG_WAITALL | socket.MSG_PEEK) == after[-rest:]   # the RoundEnd is unread
        end = RoundEnd(round=1, pages_sent=0, dirty_pages=0)
        assert session.receive(end) == end                   # the session is in DATA
    finally:
        accepted.close()
        client.close()


# ============================================================================ the source

class Listener:
    """The destination endpoint's part for data streams, in a thread: accept
    ``n`` connections, run accept_data_stream on each; sockets by stream index."""

    def __init__(self, rcvbuf: int | None = None) -> None:
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:       # inherited by the accepted sockets (and fixed, no autotuning)
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]

    def accept(self, n: int) -> list[tuple[socket.socket, Join]]:
        self.lsock.settimeout(10)
        got = []
        for _ in range(n):
            s, _ = self.lsock.accept()
            sock, join, _, _ = accept_data_stream(s, None, 5.0)
            sock.settimeout(20)
            got.append((sock, join))
        return sorted(got, key=lambda sj: sj[1].stream)

    def close(self) -> None:
        self.lsock.close()


async def open_streams(n: int, listener: Listener, token: bytes = bytes(range(16))):
    failures: list[BaseException] = []
    failed = asyncio.Event()

    def on_failure(exc):
        failures.append(exc)
        failed.set()

    out = OutboundStreams(n, on_failure)
    accepting = asyncio.ensure_future(asyncio.to_thread(listener.accept, n))
    await out.open("127.0.0.1", listener.port, MID, token, None, None, 5.0, 20.0)
    peers = await asyncio.wait_for(accepting, 10)
    assert [j for _, j in peers] == [Join(migration_id=MID, stream=i, token=token) for i in range(n)]
    return out, [s for s, _ in peers], failures, failed


def decode_stream(sock: socket.socket) -> list:
    """What one data stream carried after its Join, until EOF: (message, payload bytes)."""
    dec = FrameDecoder()
    out: list = []
    cur = None
    while True:
        chunk = sock.recv(1 << 20)
        dec.receive_data(chunk)
        while (ev := dec.next_event()) is not NEED_DATA:
            if ev is CLOSED:
                return out
            if isinstance(ev, Payload):
                cur[1].extend(ev.data)
            else:
                cur = (ev, bytearray())
                out.append(cur)


def expected_streams(n: int, sends: list, mem: bytes) -> list[list]:
    """What each stream must carry for ``sends`` (in order): split_runs, in order per stream."""
    per: list[list] = [[] for _ in range(n)]
    for kind, args in sends:
        if kind == "round-end":
            for s in per:
                s.append((RoundEnd(round=args[0], pages_sent=args[1], dirty_pages=args[2]), bytearray()))
            continue
        section, rnd, runs, zero = args
        for i, sruns in enumerate(split_runs(section, runs, n)):
            if sruns:
                b = PageBatch(section=section, round=rnd, runs=tuple(sruns),
                              flags=BatchFlags.ZERO if zero else BatchFlags.NONE,
                              payload_len=0 if zero else sum(c for _, c in sruns) * PAGE)
                data = bytearray() if zero else bytearray(b"".join(mem[f * PAGE:(f + c) * PAGE] for f, c in sruns))
                per[i].append((b, data))
    return per


def source_memory(npages: int) -> tuple[mmap.mmap, memoryview]:
    mem = mmap.mmap(-1, npages * PAGE)
    mem[:] = os.urandom(npages * PAGE)
    return mem, memoryview(mem)


def random_sends(rng, npages: int, rounds: int) -> list:
    sends = []
    for rnd in range(1, rounds + 1):
        for _ in range(rng.randint(10, 30)):
            runs, pages = [], 0
            for _ in range(rng.randint(1, 12)):
                c = rng.choice([1, 1, 2, 5, 40, 256])
                f = rng.randrange(0, npages - c)
                runs.append((f, c))
                pages += c
            sends.append(("batch", (rng.choice([0, 0, 1]), rnd, runs, rng.random() < 0.15)))
        sends.append(("round-end", (rnd, 100, 7)))
    return sends


async def run_sends(out: OutboundStreams, sends: list, view: memoryview) -> None:
    for kind, args in sends:
        if kind == "round-end":
            out.end_round(*args)
        else:
            section, rnd, runs, zero = args
            await out.send(section, rnd, runs, None if zero else view, zero=zero)


@pytest.mark.parametrize("nstreams", [1, 2, 3])
def test_batches_arrive_complete_and_in_order_per_stream(nstreams):

    npages = 6 * STREAM_CHUNK_PAGES
    mem, view = source_memory(npages)
    sends = random_sends(random.Random(nstreams), npages, rounds=3)
    listener = Listener()

    async def main() -> None:
        out, peers, failures, _ = await open_streams(nstreams, listener)
        readers = [asyncio.ensure_future(asyncio.to_thread(decode_stream, s)) for s in peers]
        try:
            await run_sends(out, sends, view)
            await out.finish_and_join(20)
            got = await asyncio.wait_for(asyncio.gather(*readers), 20)
        finally:
            await out.close()
            for s in peers:
                s.close()
        assert failures == []
        assert not any(s.is_alive() for s in out.senders)
        want = expected_streams(nstreams, sends, bytes(mem))
        for i in range(nstreams):
            assert [m for m, _ in got[i]] == [m for m, _ in want[i]], f"stream {i}"
            assert [bytes(p) for _, p in got[i]] == [bytes(p) for _, p in want[i]], f"stream {i} payloads"
        assert out.bytes_sent() == out.bytes_queued == sum(len(p) for w in want for _, p in w)

    try:
        asyncio.run(main())
    finally:
        listener.close()
        view.release()
        mem.close()           # no view of the source memory is left


def test_end_to_end_into_inbound_streams():
    """The production pair: OutboundStreams -> accept_data_stream ->
    InboundStreams.admit; the destination memory ends equal to the source's."""

    npages = 4 * STREAM_CHUNK_PAGES
    mem, view = source_memory(npages)
    sends = [(k, a) for k, a in random_sends(random.Random(7), npages, rounds=2)
             if k == "round-end" or a[0] == 0]               # one section: the destination's RAM
    guest = Guest(npages)
    listener = Listener()

    async def main() -> None:
        h = Harness(guest, n=3)
        failures: list = []
        out = OutboundStreams(3, failures.append)

        def accept_all():
            socks = []
            listener.lsock.settimeout(10)
            for _ in range(3):
                s, _ = listener.lsock.accept()
                socks.append(accept_data_stream(s, None, 5.0))
            return socks

        accepting = asyncio.ensure_future(asyncio.to_thread(accept_all))
        await out.open("127.0.0.1", listener.port, MID, h.streams.token, None, None, 5.0, 20.0)
        for sock, join, session, peer in await asyncio.wait_for(accepting, 10):
            assert h.streams.admit(join, sock, session, peer) is None
        try:
            await run_sends(out, sends, view)
            await out.finish_and_join(20)
            await h.streams.reached(2, 20)
            for i in range(3):
                await h.ended(i)
                assert h.streams.receivers[i].ended
        finally:
            await out.close()
            await h.streams.close()
        assert failures == [] and h.failures == []
        expect = bytearray(npages * PAGE)
        for kind, args in sends:     # streams may interleave, but a page's copies share one stream
            if kind == "batch":
                _, _, runs, zero = args
                for f, c in runs:
                    expect[f * PAGE:(f + c) * PAGE] = bytes(c * PAGE) if zero else mem[f * PAGE:(f + c) * PAGE]
        assert bytes(guest.mem) == bytes(expect)
        assert h.streams.bytes_received() >= out.bytes_sent()

    try:
        asyncio.run(main())
    finally:
        listener.close()
        guest.close()
        view.release()
        mem.close()


async def until(pred, timeout_s: float = 20) -> None:
    """A condition that only a thread's progress makes true (the sender
    filling its queue), polled with a deadline."""
    async with asyncio.timeout(timeout_s):
        while not pred():
            await asyncio.sleep(0.002)     # poll: only the sender thread's progress makes it true


BATCH = 256           # pages: 1 MiB, all in chunk 0 (stream 0 of section 0)


def test_backpressure_send_waits_while_the_peer_does_not_read():
    npages = 2 * STREAM_CHUNK_PAGES
    mem, view = source_memory(npages)
    total = 3 * QUEUE_BYTES // (BATCH * PAGE)        # 24 batches: far more than queue + socket buffers
    listener = Listener(rcvbuf=64 * 1024)

    async def main() -> None:
        out, peers, failures, _ = await open_streams(2, listener)
        for s in out.senders:
            s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        done = 0

        async def sender():
            nonlocal done
            for k in range(total):
                await out.send(0, 1, [((k % 4) * BATCH, BATCH)], view)
                done += 1

        task = asyncio.ensure_future(sender())
        try:
            s0 = out.senders[0]
            await until(lambda: s0.queued >= QUEUE_BYTES or task.done())
            assert not task.done(), "send never waited"
            assert done < total and s0.queued <= QUEUE_BYTES + BATCH * PAGE   # at most one batch over
            assert out.senders[1].queued == 0
            # the peer reads: the queue drains and send resumes
            reader = asyncio.ensure_future(asyncio.to_thread(decode_stream, peers[0]))
            await asyncio.wait_for(task, 30)
            assert done == total
            await out.finish_and_join(20)
            got = await asyncio.wait_for(reader, 20)
        finally:
            task.cancel()
            await out.close()
            for s in peers:
                s.close()
        assert failures == []
        assert [m.runs for m, _ in got] == [(((k % 4) * BATCH, BATCH),) for k in range(total)]
        assert all(bytes(p) == mem[m.runs[0][0] * PAGE:(m.runs[0][0] + BATCH) * PAGE] for m, p in got)

    try:
        asyncio.run(main())
    finally:
        listener.close()
        view.release()
        mem.close()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_reset_stream_fails_send_and_check_and_calls_on_failure_once():
    npages = 2 * STREAM_CHUNK_PAGES
    mem, view = source_memory(npages)
    listener = Listener()

    async def main() -> None:
        out, peers, failures, failed = await open_streams(2, listener)
        reader0 = asyncio.ensure_future(asyncio.to_thread(decode_stream, peers[0]))
        try:
            await out.send(0, 1, [(0, 4)], view)                      # stream 0
            _reset(peers[1])
            one = [(STREAM_CHUNK_PAGES, 4)]                           # chunk 1: stream 1
            for _ in range(50):     # each batch is a write into the reset connection
                if failed.is_set():
                    break
                await out.send(0, 1, one, view)
                try:
                    await asyncio.wait_for(failed.wait(), 0.5)
                    break
                except TimeoutError:
                    pass
            assert failed.is_set(), "the reset was never noticed"
            [exc] = failures
            assert isinstance(exc, PeerLost) and "data stream 1" in str(exc)
            with pytest.raises(PeerLost):
                out.check()
            with pytest.raises(PeerLost):
                await out.send(0, 1, [(0, 1)], view)
            with pytest.raises(PeerLost):
                out.end_round(1, 0, 0)
            # another stream's thread failing later reports the same way (through the loop)
            await asyncio.to_thread(out._loop.call_soon_threadsafe, out._failed, 0, ConnectionResetError("later"))
            ran = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(ran.set_result, None)   # queued after that callback: FIFO
            await ran
            assert failures == [exc] and out.failure is exc
        finally:
            await out.close()                      # stream 0 ends: its reader sees EOF
            try:
                got = await asyncio.wait_for(reader0, 10)
            finally:
                peers[0].close()
        assert not any(s.is_alive() for s in out.senders)
        assert got[0][0].runs == ((0, 4),)

    try:
        asyncio.run(main())
    finally:
        listener.close()
        view.release()
        mem.close()


def test_close_joins_the_threads_and_releases_every_view_of_the_source():
    """Views queued (the peer does not read) and one in the middle of a
    sendmsg: close() stops and joins every thread and drops them all, so the
    source memory can be unmapped at once."""
    npages = 2 * STREAM_CHUNK_PAGES
    mem, view = source_memory(npages)
    listener = Listener(rcvbuf=64 * 1024)

    async def main() -> None:
        out, peers, failures, _ = await open_streams(2, listener)
        for s in out.senders:
            s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        try:
            # per stream: up to QUEUE_BYTES queued behind a blocked sendmsg (send waits beyond it)
            per_stream = max(2, QUEUE_BYTES // (BATCH * PAGE))
            for k in range(2 * per_stream):
                await out.send(0, 1, [(k % 2 * STREAM_CHUNK_PAGES, BATCH)], view)
            assert any(s.items for s in out.senders), "nothing left queued"
            async with asyncio.timeout(10):
                await out.close()
            assert not any(s.is_alive() for s in out.senders)
            assert all(not s.items for s in out.senders)
            assert failures == []                    # a close is no failure
        finally:
            for s in peers:
                s.close()

    try:
        asyncio.run(main())
        view.release()
        mem.close()          # BufferError if any view handed to send() were still alive
    finally:
        listener.close()


LATER_PART_PINS = (
    "datastream.py bug: OutboundStreams.send's frame keeps the local `views` (the list it put on an earlier "
    "stream of the same send) when it raises the sticky failure after waiting for room on a later stream; "
    "the failure is kept by OutboundStreams.failure (and by the control connection's failure, through "
    "on_failure=conn.fail), its traceback keeps that frame, and _Sender.run's finally only drops the queued "
    "tuples (items.clear()), not the view lists in them: slices of the source memory outlive close(), and "
    "mmap.close() raises BufferError (GuestRam.close survives it only through its gc.collect() fallback, and "
    "only once nothing holds the failure)")


@pytest.mark.parametrize("blocked_on", [
    "first-stream",
    pytest.param("later-stream"),
])
def test_after_a_failure_close_releases_every_view_of_the_source(blocked_on):
    """A stream fails while ``send`` waits for room on it; the failure
    raised out of ``send`` is kept by the caller (OutboundStreams.failure,
    the control connection's failure), yet after close() no view of the
    source memory may be left: it can be unmapped at once."""
    npages = 2 * STREAM_CHUNK_PAGES
    mem, view = source_memory(npages)
    listener = Listener(rcvbuf=64 * 1024)
    raised: list[BaseException] = []
    # every send has a part for stream 0 (chunk 0) and for stream 1 (chunk 1);
    # the bigger part fills its stream first, and send waits there
    runs = [(0, 192), (STREAM_CHUNK_PAGES, 64)] if blocked_on == "first-stream" else \
        [(0, 64), (STREAM_CHUNK_PAGES, 192)]
    full = 0 if blocked_on == "first-stream" else 1

    async def main() -> None:
        out, peers, failures, failed = await open_streams(2, listener)
        for s in out.senders:
            s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)

        async def sender():
            for _ in range(64):
                await out.send(0, 1, runs, view)

        task = asyncio.ensure_future(sender())
        try:
            await until(lambda: out.senders[full].queued >= QUEUE_BYTES or task.done())
            assert not task.done()
            _reset(peers[full])
            with pytest.raises(PeerLost):
                await asyncio.wait_for(task, 20)
            raised.append(task.exception())
            assert failures == [raised[0]]
        finally:
            task.cancel()
            await out.close()
            peers[1 - full].close()
        assert not any(s.is_alive() for s in out.senders)
        assert all(not s.items for s in out.senders)
        # the caller keeps its OutboundStreams (and the failure) until its cleanup ends
        assert out.failure is raised[0]
        view.release()
        mem.close()

    try:
        asyncio.run(main())
    finally:
        listener.close()


FINISH_STOPS_SILENTLY = (
    "datastream.py bug: OutboundStreams.finish(timeout_s) -> _join stops a sender still sending at the deadline "
    "(stop() sets stopping, so the thread's send error is not reported) and then check() finds no failure: "
    "finish returns as if every page had been sent, while the stream's queued pages were dropped")


def test_finish_that_cannot_send_everything_in_time_raises():
    npages = 2 * STREAM_CHUNK_PAGES
    mem, view = source_memory(npages)
    listener = Listener(rcvbuf=64 * 1024)

    async def main() -> None:
        out, peers, failures, _ = await open_streams(1, listener)
        out.senders[0].sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        try:
            # as much as the queue takes without waiting: far above the socket buffers
            for k in range(max(2, QUEUE_BYTES // (BATCH * PAGE))):
                await out.send(0, 1, [(k * BATCH, BATCH)], view)
            # the peer reads nothing: the stream cannot end within the deadline
            with pytest.raises(PeerLost):
                await out.finish_and_join(0.3)
        finally:
            await out.close()
            peers[0].close()

    try:
        asyncio.run(main())
    finally:
        listener.close()
        view.release()
        mem.close()


SEGMENT_ERROR_LOST = (
    "datastream.py bug: InboundStreams._failed replaces every exception that is not a ProtocolError, PeerLost "
    "or PeerError by PeerLost(f'data stream {i}: ...'), so on_failure never sees the SegmentError a sink raises "
    "when /dev/shm is full (RamIncoming.payload_sink -> AheadFaulter.ensure -> reserve): "
    "destination._stream_failed's `isinstance(exc, SegmentError)` -> Abort(NO_MEMORY) branch is dead and the "
    "source only sees its connection closed (the destination's _fail sends no Abort for a PeerLost)")


def test_a_full_dev_shm_in_the_sink_reaches_on_failure_as_a_segment_error():
    from memstore import SegmentError

    guest = Guest()

    def full_sink(b: PageBatch):
        raise SegmentError("posix_fallocate: No space left on device")

    async def main() -> None:
        h = Harness(guest, sink=full_sink)
        src = await join_stream(h)
        b = batch([(0, 2)])
        await src.send(src.frame(b, payload_for(b, 1)))
        async with asyncio.timeout(10):
            await h.failed.wait()
        await h.ended()
        await h.streams.close()
        src.sock.close()
        [exc] = h.failures
        assert isinstance(exc, SegmentError), repr(exc)

    run_then_close(main, guest)
