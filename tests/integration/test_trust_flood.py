"""Connections that never authenticate, or trickle a maximal frame, neither stop a real
migration nor grow the agent's memory beyond a stated bound (``status`` rss fields).

Bounds (agent/net/endpoint.py): at most ``security.max_handshakes`` (16) connections are in
the handshake at once, the oldest unauthenticated one is evicted for a new one, and a frame
body before authentication is at most ``transport.PRE_AUTH_MAX_BODY`` (64 KiB). So:
- unauthenticated connections, however many, hold at most 16 x (TLS state + 64 KiB);
- authenticated peers trickling a maximal Prepare hold at most 16 x 4 MiB.
"""
from __future__ import annotations

import socket
import struct
import time

import pytest

from protocol import MAGIC, PROTOCOL_VERSION, FrameDecoder, Hello, Welcome, encode_frame, make_nonce
from protocol.framing import MAX_FRAME_BYTES
from protocol.wire import MsgType

from agent.control.proc import wait_for

pytestmark = pytest.mark.timeout(180)

MIB = 1 << 20
UNAUTH_BOUND = 32 * MIB                 # growth allowed while unauthenticated floods are held
AUTH_BOUND = 16 * 4 * MIB + 32 * MIB    # 16 handshaking peers x one maximal frame, plus slack


def rss(ag) -> tuple[int, int]:
    st = ag.call("status")
    return st["rss_anon_bytes"], st["rss_bytes"]


def migrate_and_check(a, b, vm: str) -> dict:
    a.call("vm.create", name=vm, memory="64M", workload="uniform:rate=2000", prefill="random")
    t0 = time.monotonic()
    rep = a.call("migrate", timeout_s=None, vm=vm, to=b.addr, wait=True)
    assert rep["status"] == "completed" and rep["verified"], rep
    assert time.monotonic() - t0 < 30
    b.call("vm.delete", name=vm)
    return rep


def open_idle(addr: str, n: int) -> list[socket.socket]:
    host, port = addr.rsplit(":", 1)
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((host, int(port)))          # no bytes sent, ever
        socks.append(s)
    return socks


def test_500_idle_connections_do_not_stop_a_migration(agents):
    a, b = agents("A"), agents("B")
    base_anon, base_rss = rss(b)
    socks = open_idle(b.addr, 500)
    try:
        wait_for(lambda: b.call("status")["security"]["handshakes_evicted"] >= 500 - 16, 30, 0.05,
                 what="B to have taken (and evicted) the idle connections")
        sec = b.call("status")["security"]
        assert sec["handshaking"] <= 16
        migrate_and_check(a, b, "vm1")             # while they are all still open on our side
        anon, total = rss(b)
        assert anon - base_anon < UNAUTH_BOUND, (base_anon, anon)
        assert total - base_rss < UNAUTH_BOUND, (base_rss, total)
        assert a.call("ping")["agent"] == "A"
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: b.call("status")["security"]["handshaking"] == 0, 20, what="handshakes to end")


def _maximal_prefix(msg_type: MsgType) -> bytes:
    return struct.pack("!4sHHII", MAGIC, int(msg_type), 0, MAX_FRAME_BYTES, 0)


def _send_quietly(s, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:                            # refused or evicted: the agent closed it
        pass


BODY_BUT_ONE = b"\x00" * (MAX_FRAME_BYTES - 1)


@pytest.mark.parametrize("mode", ["insecure", "tls"])
def test_64_unauthenticated_maximal_frames_cost_nothing(agents, mode):
    a = agents("A", insecure=mode == "insecure")
    b = agents("B", "--set", "security.handshake_timeout_s=60", insecure=mode == "insecure")
    base_anon, _ = rss(b)
    socks = []
    try:
        for _ in range(64):
            if mode == "tls":
                s = agents.tls_connect(b.addr, name="trickler")      # a valid certificate, then no Hello
            else:
                host, port = b.addr.rsplit(":", 1)
                s = socket.create_connection((host, int(port)), timeout=10)
            s.settimeout(5)
            socks.append(s)
            _send_quietly(s, _maximal_prefix(MsgType.HELLO) + BODY_BUT_ONE)
        anon, _ = rss(b)
        assert anon - base_anon < UNAUTH_BOUND, (base_anon, anon)
        migrate_and_check(a, b, "vm1")
    finally:
        for s in socks:
            s.close()


def test_64_authenticated_peers_trickling_a_maximal_prepare_are_bounded(agents):
    a = agents("A")
    b = agents("B", "--set", "security.handshake_timeout_s=60")
    base_anon, _ = rss(b)
    socks = []
    try:
        for _ in range(64):
            s = agents.tls_connect(b.addr, name="trickler")
            s.settimeout(5)
            socks.append(s)
            s.sendall(encode_frame(Hello(version_min=PROTOCOL_VERSION, version_max=PROTOCOL_VERSION,
                                         agent="trickler", features=(), max_live_migrations=1, nonce=make_nonce())))
            dec = FrameDecoder()
            ev = None
            while not isinstance(ev, Welcome):                 # authenticated: B answered
                dec.receive_data(s.recv(65536))
                ev = dec.next_event()
            _send_quietly(s, _maximal_prefix(MsgType.PREPARE) + BODY_BUT_ONE)
        sec = b.call("status")["security"]
        assert sec["handshaking"] <= 16 and sec["handshakes_evicted"] >= 64 - 16, sec
        anon, _ = rss(b)
        assert anon - base_anon < AUTH_BOUND, (base_anon, anon)
        migrate_and_check(a, b, "vm1")
        assert b.call("status")["security"]["established"] == 0
    finally:
        for s in socks:
            s.close()
