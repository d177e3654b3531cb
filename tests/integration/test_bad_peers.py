"""A misbehaving peer gets an error where possible and a closed connection;
the agent keeps serving everyone else."""
from __future__ import annotations

import socket
import struct

import pytest

from protocol import MAGIC, PREFIX_SIZE, PROTOCOL_VERSION, Abort, FrameDecoder, Hello, Prepare, encode_frame, make_nonce

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def agents(plain_agents):
    """These tests speak the wire protocol on plain sockets: their agents run without TLS."""
    return plain_agents


def connect(addr: str) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def read_until_closed(s: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def answer(data: bytes):
    dec = FrameDecoder()
    dec.receive_data(data)
    dec.receive_data(b"")
    return dec.next_event()


CASES = {
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "garbage": bytes(range(256)) * 4,
    "oversized": struct.pack("!4sHHII", MAGIC, 1, 0, 1 << 30, 0),
    "unknown-type": struct.pack("!4sHHII", MAGIC, 999, 0, 1, 0) + b"\x80",
    "bad-body": struct.pack("!4sHHII", MAGIC, 1, 0, 3, 0) + b"\xc1\xc1\xc1",
    "wrong-first-message": encode_frame(Prepare(migration_id="m1", vm="v", memory_bytes=4096, workload="idle",
                                                features=(), source="x", sections=("ram",),
                                                setup=b"\x90", verify_mode="incremental", streams=1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_abort_and_close(agents, case):
    a = agents("A")
    with connect(a.addr) as s:
        s.sendall(CASES[case])
        reply = read_until_closed(s)
    ev = answer(reply)
    assert isinstance(ev, Abort), (case, reply[:80])
    assert ev.reason
    assert a.call("ping")["agent"] == "A"


def test_truncated_and_stalled_peers_are_dropped(agents):
    a = agents("A", "--set", "migration.handshake_timeout_s=1")
    hello = encode_frame(Hello(version_min=PROTOCOL_VERSION, version_max=PROTOCOL_VERSION, agent="x", features=(), max_live_migrations=1,
                               nonce=make_nonce()))
    with connect(a.addr) as stalled, connect(a.addr) as truncated:
        truncated.sendall(hello[: PREFIX_SIZE + 3])
        truncated.shutdown(socket.SHUT_WR)              # EOF in the middle of a frame
        read_until_closed(truncated)
        # The stalled peer says nothing: the handshake timeout closes it.
        read_until_closed(stalled)
    assert a.call("ping")["agent"] == "A"


def test_agent_serves_others_while_bad_peers_connect(agents):
    a, b = agents("A"), agents("B")
    a.call("vm.create", name="vm1", memory="32M", workload="uniform:rate=2000")
    bad = [connect(b.addr) for _ in range(5)]
    try:
        for s in bad:
            s.sendall(CASES["http"])
        report = a.call("migrate", vm="vm1", to=b.addr, wait=True, timeout_s=None)
        assert report["status"] == "completed" and report["verified"], report
    finally:
        for s in bad:
            s.close()
    b.call("vm.delete", name="vm1")
