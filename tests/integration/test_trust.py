"""Who may migrate to an agent: only a peer with a certificate from the cluster CA that names
the agent it says it is, over a stream nobody altered. Every refused attempt leaves the
destination without a VM, a file, a segment or a slot, and the VM running on the source."""
from __future__ import annotations

import json
import os
import socket
import stat
import ssl
import threading
from types import SimpleNamespace

import pytest

from protocol import PROTOCOL_VERSION, Hello, Prepare, Welcome, encode_frame, make_nonce

from agent.control.proc import ThrowawayCA, wait_for
from agent.net import tls

pytestmark = pytest.mark.timeout(120)


def files_under(path: str) -> set[str]:
    out = set()
    for root, _, names in os.walk(path):
        out.update(os.path.relpath(os.path.join(root, n), path) for n in names)
    return out


def segments(prefix: str, agent: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"{prefix}.{agent}.")]


class Untouched:
    """What the destination holds before an attempt; ``check()`` waits until it holds exactly that again."""

    def __init__(self, ag, prefix: str, allow: frozenset = frozenset()) -> None:
        self.ag, self.prefix, self.allow = ag, prefix, allow
        self.files = files_under(ag.data_dir)

    def state(self):
        st = self.ag.call("status")
        new = files_under(self.ag.data_dir) - self.files - self.allow
        return (self.ag.call("vm.list"), segments(self.prefix, self.ag.name), new,
                st["live_migrations_running"], st["security"]["established"])

    def check(self, timeout_s: float = 20.0) -> None:
        wait_for(lambda: self.state() == ([], [], set(), 0, 0), timeout_s, 0.05,
                 what=f"{self.ag.name} back to holding nothing (now {self.state()})")


def log_events(ag, event: str) -> list[dict]:
    return [e for e in (json.loads(ln) for ln in open(ag.log_path) if ln.startswith("{")) if e.get("event") == event]


def hello(agent: str) -> bytes:
    return encode_frame(Hello(version_min=PROTOCOL_VERSION, version_max=PROTOCOL_VERSION, agent=agent, features=(),
                              max_live_migrations=1, nonce=make_nonce()))


def prepare(vm: str) -> bytes:
    return encode_frame(Prepare(migration_id="m-evil", vm=vm, memory_bytes=4096 * 256, workload="idle", features=(),
                                source="x", sections=("ram",), setup=b"\x90", verify_mode="incremental", streams=1))


def read_all(s) -> bytes:
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
    except (ssl.SSLError, OSError):
        return data


def attempt(addr: str, ctx: ssl.SSLContext, say: str) -> bytes:
    """Connect with ``ctx``, say Hello as ``say`` and at once a Prepare; what came back before the close."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        try:
            s = ctx.wrap_socket(raw, server_hostname=None)
        except (ssl.SSLError, OSError):
            return b""                                      # refused during the handshake
        with s:
            try:
                s.sendall(hello(say) + prepare("evil"))
            except (ssl.SSLError, OSError):
                return b""
            return read_all(s)


def bare_client_context(cred: dict | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cred["ca_file"]) if cred else None
    if not cred:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_a_peer_without_a_certificate_gets_nothing(agents, cluster_ca):
    b = agents("B")
    before = Untouched(b, agents.prefix)
    ctx = bare_client_context(cluster_ca.credentials("B"))          # trusts B, shows no certificate itself
    assert attempt(b.addr, ctx, "A") == b""
    before.check()
    refused = wait_for(lambda: log_events(b, "peer_refused"), 10, what="peer_refused in B's log")
    assert refused[0]["peer"].startswith("127.0.0.1:") and "TLS handshake failed" in refused[0]["reason"]


def test_a_peer_with_a_certificate_from_another_ca_gets_nothing(agents, cluster_ca, tmp_path):
    other = ThrowawayCA(str(tmp_path / "other-ca"))
    b = agents("B")
    before = Untouched(b, agents.prefix)
    # A client that trusts B but shows a certificate from another CA: B refuses it.
    ctx = bare_client_context(cluster_ca.credentials("B"))
    cred = other.credentials("A")
    ctx.load_cert_chain(cred["cert_file"], cred["key_file"])
    assert attempt(b.addr, ctx, "A") == b""
    before.check()
    refused = wait_for(lambda: log_events(b, "peer_refused"), 10, what="peer_refused in B's log")
    assert refused[0]["peer"].startswith("127.0.0.1:")
    assert "CERTIFICATE_VERIFY_FAILED" in refused[0]["reason"] or "unknown ca" in refused[0]["reason"].lower()
    # A real agent of the other cluster: it does not trust B's certificate either, so it leaves first.
    a = agents("A", ca=other)
    a.call("vm.create", name="vm1", memory="32M", workload="uniform:rate=2000")
    b.call("vm.create", name="vm2", memory="16M", workload="idle")
    try:
        rep = a.call("migrate", timeout_s=None, vm="vm1", to=b.addr, wait=True)
        assert rep["status"] == "failed" and "TLS handshake" in rep["error"], rep
        assert a.call("vm.show", name="vm1")["state"] == "running"
        rep = b.call("migrate", timeout_s=None, vm="vm2", to=a.addr, wait=True)
        assert rep["status"] == "failed" and "TLS handshake" in rep["error"], rep
        assert b.call("vm.show", name="vm2")["state"] == "running"
        assert [v["name"] for v in b.call("vm.list")] == ["vm2"] and [v["name"] for v in a.call("vm.list")] == ["vm1"]
    finally:
        a.call("vm.delete", name="vm1")
        b.call("vm.delete", name="vm2")


def test_a_certificate_for_another_name_gets_nothing(agents, cluster_ca):
    b = agents("B")
    before = Untouched(b, agents.prefix)
    # A valid certificate from the cluster CA, but for agent C, claiming to be A.
    reply = attempt(b.addr, cluster_ca.client_context("C"), "A")
    assert reply == b"", reply[:80]                  # not even a Reject: a closed connection
    before.check()
    refused = wait_for(lambda: log_events(b, "peer_refused"), 10, what="peer_refused in B's log")
    assert "certificate names 'C' but Hello says 'A'" in refused[0]["reason"]
    # The control: the same certificate saying its own name is let through to the protocol
    # (and then refused by admission for its made-up VM, with an answer).
    assert attempt(b.addr, cluster_ca.client_context("C"), "C") != b""
    wait_for(lambda: b.call("status")["security"]["handshaking"] == 0, 10, what="handshakes done")


def test_a_destination_whose_certificate_names_another_agent_is_left(agents, cluster_ca):
    """The source side of the name check: a TLS server holding C's certificate that answers as B."""
    a = agents("A")
    cred = cluster_ca.credentials("C")
    server_ctx = tls.server_context.__wrapped__(SimpleNamespace(**cred))
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    got: list[bytes] = []

    def serve():
        conn, _ = lsock.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as s:
            got.append(s.recv(65536))
            s.sendall(encode_frame(Welcome(version=PROTOCOL_VERSION, agent="B", features=(), max_live_migrations=2,
                                           slots=1, nonce=make_nonce(), proof=b"", slots_free=2,
                                           memory_free_bytes=1 << 34, status="accepting")))
            got.append(read_all(s))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        a.call("vm.create", name="vm1", memory="16M", workload="idle")
        rep = a.call("migrate", timeout_s=None, vm="vm1", to=f"127.0.0.1:{port}", wait=True)
        assert rep["status"] == "failed", rep
        assert "says it is agent 'B' but its certificate names 'C'" in rep["error"], rep
        assert a.call("vm.show", name="vm1")["state"] == "running"
        t.join(10)
        assert got and got[0][:4] == b"LMIG"                 # it got our Hello ...
        assert b"vm1" not in b"".join(got)                   # ... and nothing about the VM
    finally:
        lsock.close()
        a.call("vm.delete", name="vm1")


class FlipProxy:
    """Relays one TCP stream each way; flips one byte of the source->destination stream at ``offset``."""

    def __init__(self, target: str, offset: int) -> None:
        h, p = target.rsplit(":", 1)
        self.target = (h, int(p))
        self.offset = offset
        self.flipped = 0
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            u = socket.create_connection(self.target)
            self.socks += [c, u]
            for src, dst, flip in ((c, u, True), (u, c, False)):
                th = threading.Thread(target=self._pipe, args=(src, dst, flip), daemon=True)
                th.start()
                self.threads.append(th)

    def _pipe(self, src: socket.socket, dst: socket.socket, flip: bool) -> None:
        seen = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if flip and seen <= self.offset < seen + len(data):
                    b = bytearray(data)
                    b[self.offset - seen] ^= 0x01
                    data = bytes(b)
                    self.flipped += 1
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.lsock.close()
        for s in self.socks:
            s.close()
        for th in self.threads:
            th.join(5)


@pytest.mark.parametrize("offset", [200, 4 << 20], ids=["in-the-handshake", "in-the-pages"])
def test_a_man_in_the_middle_changing_one_byte_stops_the_migration(agents, offset):
    a, b = agents("A"), agents("B")
    # In the pages the peer was authenticated: B ran (and ended) an inbound job, which its
    # job history records; no other file may stay.
    before = Untouched(b, agents.prefix, allow=frozenset({"history.jsonl"}) if offset > 4096 else frozenset())
    a.call("vm.create", name="vm1", memory="64M", workload="uniform:rate=2000", prefill="random")
    proxy = FlipProxy(b.addr, offset)
    try:
        rep = a.call("migrate", timeout_s=None, vm="vm1", to=proxy.addr, wait=True)
        assert proxy.flipped >= 1
        assert rep["status"] == "failed", rep
        assert a.call("vm.show", name="vm1")["state"] == "running"
        before.check()
    finally:
        proxy.close()
        a.call("vm.delete", name="vm1")


def test_the_same_proxy_without_a_flip_is_transparent(agents):
    """The control for the test above: the relay itself does not break migrations."""
    a, b = agents("A"), agents("B")
    a.call("vm.create", name="vm1", memory="64M", workload="uniform:rate=2000", prefill="random")
    proxy = FlipProxy(b.addr, offset=1 << 62)
    try:
        rep = a.call("migrate", timeout_s=None, vm="vm1", to=proxy.addr, wait=True)
    finally:
        proxy.close()
    assert rep["status"] == "completed" and rep["verified"], rep
    b.call("vm.delete", name="vm1")


def _socket_of(ag) -> os.stat_result:
    return os.stat(ag.control)


def test_control_socket_is_owner_only_by_default(agents):
    a = agents("A")
    st = _socket_of(a)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()


def test_control_group_is_given_the_socket(tmp_path):
    """ControlServer with control.group: a real Unix socket chowned to the group, mode 0660."""
    import asyncio
    import grp

    from agent.control.server import ControlClient, ControlServer

    group = grp.getgrgid(os.getgroups()[-1] if os.getuid() else 1)   # root: any group, e.g. daemon
    path = str(tmp_path / "c.sock")

    async def run():
        async def ping(args):
            return "pong"
        srv = ControlServer(path, 0o600, {"ping": ping}, group=group.gr_name)
        await srv.start()
        try:
            st = os.stat(path)
            loop = asyncio.get_running_loop()
            answer = await loop.run_in_executor(None, lambda: ControlClient(path, timeout_s=5).call("ping"))
            return stat.S_IMODE(st.st_mode), st.st_gid, answer
        finally:
            await srv.close()

    mode, gid, answer = asyncio.run(asyncio.wait_for(run(), 20))
    assert (mode, gid, answer) == (0o660, group.gr_gid, "pong")
    assert not os.path.exists(path)


def test_agent_gives_its_control_socket_to_control_group(agents):
    import grp

    group = grp.getgrgid(os.getgroups()[-1] if os.getuid() else 1)
    a = agents("A", "--set", f"control.group={group.gr_name}")
    st = _socket_of(a)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid
