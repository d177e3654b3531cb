"""Edge cases of the wire conversation, driven by a raw protocol client."""
from __future__ import annotations

import os
import socket

import msgpack
import pytest

from protocol import (
    RoundEnd,
    StateTransfer,
    PROTOCOL_VERSION,
    NEED_DATA,
    DATA_STREAM_MAGIC,
    BatchFlags,
    Hello,
    Join,
    MigrationSession,
    PageBatch,
    Payload,
    Prepare,
    Query,
    QueryResult,
    Ready,
    Reject,
    Role,
    FrameDecoder,
    make_nonce,
)
from protocol.messages import Abort, Welcome
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def agents(plain_agents):
    """These tests speak the wire protocol on plain sockets: their agents run without TLS."""
    return plain_agents
PAGE = 4096


class RawSource:
    """A hand-driven source: real socket, real codec, no agent."""

    def __init__(self, addr: str) -> None:
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.session = MigrationSession(Role.SOURCE)
        self.decoder = FrameDecoder()
        self.streams: list = []

    def send(self, msg, payload: bytes = b"") -> None:
        self.sock.sendall(self.session.send(msg) + payload)

    def recv(self):
        while True:
            ev = self.decoder.next_event()
            if ev is NEED_DATA:
                data = self.sock.recv(65536)
                self.decoder.receive_data(data)
                if not data:
                    return None
                continue
            if isinstance(ev, Payload):
                continue
            if isinstance(ev, Abort):
                return ev
            return self.session.receive(ev)

    def open_streams(self, ready: Ready, mid: str) -> list:
        """The data streams Ready granted: magic, Join, then pages and RoundEnds go on them."""
        host, port = self.sock.getpeername()[:2]
        out = []
        for i in range(ready.streams):
            s = socket.create_connection((host, port), timeout=10)
            sess = MigrationSession(Role.SOURCE)
            s.sendall(DATA_STREAM_MAGIC + sess.send(Join(migration_id=mid, stream=i, token=ready.token)))
            out.append((s, sess))
        self.streams = out
        return out

    def stream_send(self, i: int, msg, payload: bytes = b"") -> None:
        s, sess = self.streams[i]
        s.sendall(sess.send(msg) + payload)

    def end_round(self, round_no: int) -> None:
        """RoundEnd on every data stream, then on the control connection."""
        for i in range(len(self.streams)):
            self.stream_send(i, RoundEnd(round=round_no, pages_sent=0, dirty_pages=0))
        self.send(RoundEnd(round=round_no, pages_sent=0, dirty_pages=0))

    def hello(self) -> Welcome:
        self.send(Hello(version_min=PROTOCOL_VERSION, version_max=PROTOCOL_VERSION, agent="raw", features=(), max_live_migrations=1,
                        nonce=make_nonce()))
        w = self.recv()
        assert isinstance(w, Welcome), w
        return w

    def close(self) -> None:
        for s, _ in self.streams:
            s.close()
        self.sock.close()


def prepare(mid: str, vm: str = "raw-vm", pages: int = 256) -> Prepare:
    return Prepare(migration_id=mid, vm=vm, memory_bytes=pages * PAGE, workload="idle", features=(),
                   source="raw", sections=("ram",), setup=msgpack.packb([{"populated": []}]),
                   verify_mode="incremental", streams=1)


def test_out_of_range_batch_leaves_nothing_behind(agents, shm_prefix):
    b = agents("B")
    src = RawSource(b.addr)
    try:
        src.hello()
        src.send(prepare("mid-1"))
        ready = src.recv()
        assert isinstance(ready, Ready)
        src.open_streams(ready, "mid-1")
        bad = PageBatch(section=0, round=1, runs=((0, 1), (256, 1)), flags=BatchFlags.NONE, payload_len=2 * PAGE)
        src.stream_send(0, bad, b"\x01" * 2 * PAGE)      # a data stream's batch, checked before any byte lands
        ev = src.recv()
        assert isinstance(ev, Abort) and "beyond" in ev.reason
    finally:
        src.close()
    wait_for(lambda: b.call("vm.list") == [] and b.call("jobs")[0]["state"] == "failed", 20,
             what="shell discarded")
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"{shm_prefix}.B.")]
    # The name is free again: a real migration of a VM with that name works.
    a = agents("A")
    a.call("vm.create", name="raw-vm", memory="16M", workload="idle")
    assert a.call("migrate", vm="raw-vm", to=b.addr, wait=True, timeout_s=None)["status"] == "completed"
    b.call("vm.delete", name="raw-vm")


def test_migration_id_cannot_be_reused(agents):
    b = agents("B")
    first, second = RawSource(b.addr), RawSource(b.addr)
    try:
        first.hello()
        first.send(prepare("mid-dup", vm="one"))
        assert isinstance(first.recv(), Ready)
        second.hello()
        second.send(prepare("mid-dup", vm="two"))
        r = second.recv()
        assert isinstance(r, Reject) and "already known" in r.reason
    finally:
        first.close()
        second.close()
    wait_for(lambda: b.call("vm.list") == [], 20, what="first shell discarded")


def test_query_says_running_after_the_vm_moved_on(agents):
    a, b, c = agents("A"), agents("B"), agents("C")
    a.call("vm.create", name="vm1", memory="16M", workload="uniform:rate=500")
    first = a.call("migrate", vm="vm1", to=b.addr, wait=True, timeout_s=None)
    assert first["status"] == "completed"
    assert b.call("migrate", vm="vm1", to=c.addr, wait=True, timeout_s=None)["status"] == "completed"
    # B no longer holds the VM, but it did take it in the first migration: a source
    # resolving an in-doubt switchover must hear "running" (never resume a second copy).
    for attempt in range(2):
        q = RawSource(b.addr)
        try:
            q.hello()
            q.send(Query(migration_id=first["id"]))
            res = q.recv()
            assert isinstance(res, QueryResult) and res.state == "running", res
        finally:
            q.close()
        if attempt == 0:
            agents.restart(b)               # the answer survives a restart of the destination
    c.call("vm.delete", name="vm1")


@pytest.mark.parametrize("case", ["other-workload", "counter-near-u64-end"])
def test_vcpu_state_must_be_the_announced_vms(agents, shm_prefix, case):
    """Values from a peer are checked against the VM it claims to be: a vCPU state with
    another workload, or a write counter near 2**64 (the guest would stop for good), is a
    protocol error before anything resumes; the shell is discarded."""
    b = agents("B")
    src = RawSource(b.addr)
    try:
        src.hello()
        src.send(prepare("mid-v"))
        ready = src.recv()
        assert isinstance(ready, Ready)
        src.open_streams(ready, "mid-v")
        src.end_round(1)
        state = {"writes": 10, "seed": 1, "cursor": 0, "workload": "idle"}
        if case == "other-workload":
            state["workload"] = "uniform:rate=100"
        else:
            state["writes"] = 2**64 - 5
        src.send(StateTransfer(vcpu_state=msgpack.packb(state), device_state=b""))
        ev = src.recv()
        while ev is not None and not isinstance(ev, Abort):     # RoundAck first
            ev = src.recv()
        assert isinstance(ev, Abort) and ("workload" in ev.reason or "range" in ev.reason), ev
    finally:
        src.close()
    wait_for(lambda: b.call("vm.list") == [] and b.call("jobs")[0]["state"] == "failed", 20,
             what="shell discarded")
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"{shm_prefix}.B.")]
