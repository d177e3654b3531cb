"""Migration endpoint: the TCP listener for inbound migrations and queries.

A connection goes through two stages, each with its own bound:

``handshaking``  from the TCP accept until its first request (Prepare or
                 Query) arrived from an authenticated peer: mutual TLS (when
                 ``security.mode = "tls"``), the name check, Hello/Welcome/Auth.
                 At most ``security.max_handshakes`` at a time, each for at most
                 ``security.handshake_timeout_s`` in all. When the stage is full
                 a new connection evicts the oldest unauthenticated one that had
                 EVICT_GRACE_S to finish (then an authenticated one that had as
                 long, then any unauthenticated one, then the oldest), so connections that sit idle or trickle bytes
                 can delay a real peer by one eviction, never lock it out, and
                 cost a bounded amount of memory (frames before authentication
                 are at most ``transport.PRE_AUTH_MAX_BODY``).
``established``  an authenticated migration (Prepare): at most
                 ``limits.max_connections``; beyond it the Prepare is answered
                 BUSY (the source requeues). A Query (in-doubt resolution) is
                 answered at once and never counts, so no number of migrations
                 can starve it.

Nothing of a migration (slot, reservation, VM name, file) exists before the
handshaking stage ends: ``DestinationMigration`` creates them only after
``accept.accept`` returned the request. A peer that fails TLS or the name
check is logged with its address and reason and gets a closed connection.

A data stream of a migration (``agent.net.datastream``) starts with
DATA_STREAM_MAGIC in plaintext: the first bytes are peeked (nothing is
consumed from a control connection), and a data stream goes to a thread
for its TLS handshake and Join, still inside the handshaking stage and its
bounds; its Join must name a migration this host is receiving, with that
migration's token (and, with TLS, a certificate of the same agent).

One tracked task per connection (``agent.daemon.tasks.TaskSet``). ``bind()``
listens without accepting (the agent adopts its VMs in between), ``serve()``
starts accepting. Shutdown gives inbound migrations the same grace as
outbound ones; one that owns its VM already (from Resume on) or is
discarding is never cancelled.
"""
from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import threading
import time

from protocol import DATA_STREAM_MAGIC, MigrationSession, ProtocolError, Query, Role
from protocol.framing import MAX_FRAME_BYTES

from agent.daemon.config import parse_hostport
from agent.daemon.host import Host
from agent.daemon.tasks import TaskSet
from agent.errors import PeerLost
from agent.migration.destination import DestinationMigration
from agent.migration.phases import is_cancellable
from agent.net import datastream, tls
from agent.net.transport import PRE_AUTH_MAX_BODY, FrameProtocol
from agent.observe.logs import get_logger

log = get_logger("livemig.endpoint")

ACCEPT_BACKLOG = 1024
ACCEPT_CAPACITY_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)
ACCEPT_RETRY_S = 0.1
LOG_BURST = 20          # lines per event kind per LOG_WINDOW_S, then one summary: a flood cannot flood the log
LOG_WINDOW_S = 1.0
EVICT_GRACE_S = 0.5     # an unauthenticated connection younger than this is evicted last


async def _in_own_thread(fn, *args):
    """``fn(*args)`` in a thread of its own, not the loop's default executor:
    a data stream's handshake may block for the gate's timeout, and a flood
    of them (bounded by the gate) must not starve the agent's other blocking
    calls. Cancelled meanwhile: a socket it returns later is closed."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(result, exc) -> None:
        if fut.done():                       # cancelled: nobody takes the socket
            if exc is None:
                result[0].close()
            return
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)

    def run() -> None:
        try:
            result, exc = fn(*args), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            result, exc = None, e.with_traceback(None)
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:                 # the loop is closed: the agent is gone
            if result is not None:
                result[0].close()

    threading.Thread(target=run, name="data-stream-accept", daemon=True).start()
    return await fut


class _Throttle:
    """At most LOG_BURST warnings per event per window; the rest are counted and reported once."""

    def __init__(self) -> None:
        self._windows: dict[str, list] = {}      # event -> [window start, lines, suppressed]

    def warning(self, event: str, **kw) -> None:
        now = time.monotonic()
        w = self._windows.setdefault(event, [now, 0, 0])
        if now - w[0] >= LOG_WINDOW_S:
            if w[2]:
                log.warning("log_suppressed", event_name=event, count=w[2], window_s=round(now - w[0], 1))
            w[:] = [now, 0, 0]
        if w[1] < LOG_BURST:
            w[1] += 1
            log.warning(event, **kw)
        else:
            w[2] += 1


class _Handshake:
    """One connection in the handshaking stage (see the module doc)."""

    __slots__ = ("gate", "peer", "sock", "conn", "authed", "timer", "done", "counted", "dropped", "t0")

    def __init__(self, gate: "HandshakeGate", sock: socket.socket, peer: str) -> None:
        self.gate = gate
        self.peer = peer
        self.sock = sock
        self.conn: FrameProtocol | None = None
        self.authed = False
        self.timer: asyncio.TimerHandle | None = None
        self.done = False              # left the handshaking stage
        self.counted = False           # holds a place under limits.max_connections
        self.dropped = False
        self.t0 = time.monotonic()

    # called by agent.net.accept once the peer is authenticated
    def authenticated(self) -> None:
        self.authed = True
        if self.conn is not None:
            self.conn.max_body_bytes = self.gate.max_body_after_auth
            self.conn.refuse_silently = False

    # called by agent.net.accept with the first request: False = no place, answer BUSY
    def admit(self, request) -> bool:
        self.gate._leave(self)
        if isinstance(request, Query):
            return True
        if self.gate.established >= self.gate.max_established:
            return False
        self.gate.established += 1
        self.counted = True
        return True

    def drop(self, reason: str) -> None:
        """End a connection still handshaking (timeout or eviction)."""
        if self.done:
            return
        self.gate._leave(self)
        self.dropped = True
        conn = self.conn
        in_tls = conn is None or conn.transport is None
        self.gate.throttle.warning("handshake_dropped", peer=self.peer, reason=reason,
                                   stage="tls" if in_tls and self.gate.tls else "protocol")
        if not in_tls:
            conn.fail(PeerLost(f"handshake with {self.peer} dropped: {reason}"))
            conn.transport.abort()
        else:
            try:                       # the fd stays the transport's: shut down, never closed here
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class HandshakeGate:
    def __init__(self, max_handshakes: int, timeout_s: float, max_established: int, max_body_after_auth: int,
                 tls: bool) -> None:
        self.max_handshakes = max_handshakes
        self.timeout_s = timeout_s
        self.max_established = max_established
        self.max_body_after_auth = max_body_after_auth
        self.tls = tls
        self.pending: dict[int, _Handshake] = {}     # insertion order = age
        self.established = 0
        self.evicted = 0
        self.timed_out = 0
        self.throttle = _Throttle()

    def _victim(self) -> _Handshake:
        """Whom a new connection evicts when the stage is full, oldest first in
        each class: an unauthenticated one that had EVICT_GRACE_S to finish;
        an authenticated one that had as long and still sent no request (a
        trickler); any unauthenticated one; then the oldest of all. So a
        peer's connections made together (a migration's data streams) do not
        evict each other while their TLS handshakes run, and a flood of young
        unauthenticated connections evicts itself, not a peer that finished
        TLS a moment ago."""
        now = time.monotonic()
        pending = self.pending.values()
        return (next((h for h in pending if not h.authed and now - h.t0 >= EVICT_GRACE_S), None)
                or next((h for h in pending if h.authed and now - h.t0 >= EVICT_GRACE_S), None)
                or next((h for h in pending if not h.authed), None) or next(iter(pending)))

    def enter(self, sock: socket.socket, peer: str) -> _Handshake:
        while len(self.pending) >= self.max_handshakes:
            victim = self._victim()
            self.evicted += 1
            victim.drop(f"{self.max_handshakes} connections already handshaking; this one was the oldest")
        h = _Handshake(self, sock, peer)
        self.pending[id(h)] = h
        h.timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire, h)
        return h

    def _expire(self, h: _Handshake) -> None:
        if not h.done:
            self.timed_out += 1
            h.drop(f"no request within {self.timeout_s:g} s of connecting")

    def _leave(self, h: _Handshake) -> None:
        if not h.done:
            h.done = True
            self.pending.pop(id(h), None)
            if h.timer is not None:
                h.timer.cancel()

    def closed(self, h: _Handshake) -> None:
        self._leave(h)
        if h.counted:
            h.counted = False
            self.established -= 1

    def snapshot(self) -> dict:
        return {"handshaking": len(self.pending), "established": self.established,
                "handshakes_evicted": self.evicted, "handshakes_timed_out": self.timed_out}


class MigrationEndpoint:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.sock: socket.socket | None = None
        self.tasks = TaskSet("endpoint")
        self._accepting: asyncio.Task | None = None
        self._conns = 0
        sec = host.cfg.security
        self.ssl_context: ssl.SSLContext | None = tls.server_context(sec) if sec.tls else None
        self.gate = HandshakeGate(sec.max_handshakes, sec.handshake_timeout_s, host.cfg.limits.max_connections,
                                  max_body_after_auth=MAX_FRAME_BYTES, tls=sec.tls)

    async def bind(self) -> tuple[str, int]:
        # Our own accept loop, not loop.create_server: a connection must be in the
        # handshake gate before a byte of it is read (TLS included), and the gate
        # must be able to end it at any point of the TLS handshake.
        h, p = parse_hostport(self.host.cfg.agent.listen)
        family = socket.AF_INET6 if ":" in h else socket.AF_INET
        try:
            self.sock = socket.create_server((h, p), family=family, backlog=ACCEPT_BACKLOG)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {h}:{p}: {exc.strerror}") from exc
        self.sock.setblocking(False)
        addr = self.sock.getsockname()
        sec = self.host.cfg.security
        if sec.tls:
            info = tls.cert_info(sec.cert_file)
            log.info("tls_enabled", certificate=info.name, issuer=info.issuer, not_after=info.not_after,
                     ca_file=sec.ca_file)
        else:
            log.warning("security_insecure", listen=f"{addr[0]}:{addr[1]}",
                        risk="no TLS: anyone who reaches this port can read and alter migrations and create VMs "
                             "here (security.mode = \"insecure\")")
        return addr[0], addr[1]

    async def serve(self) -> None:
        listener, self.sock = self.sock, None          # the accept loop owns it from here
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(listener), name="endpoint-accept")

    async def start(self) -> tuple[str, int]:
        addr = await self.bind()
        await self.serve()
        return addr

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    sock, addr = await loop.sock_accept(listener)
                except OSError as exc:
                    if exc.errno in ACCEPT_CAPACITY_ERRNOS:      # out of fds or memory: wait, then go on (trio)
                        log.error("accept_failed", error=str(exc), retry_in_s=ACCEPT_RETRY_S)
                        await asyncio.sleep(ACCEPT_RETRY_S)
                        continue
                    log.exception("accept_loop_failed")
                    raise
                self._accepted(sock, addr)
        finally:
            listener.close()                 # here, once the loop no longer waits on it

    def _accepted(self, sock: socket.socket, addr) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self._spawn(sock, f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr))

    def _spawn(self, sock: socket.socket, peer: str) -> None:
        h = self.gate.enter(sock, peer)
        self._conns += 1
        holder: dict = {}

        def cancellable() -> bool:
            inbound = holder.get("inbound")
            if inbound is None:
                return True
            job = inbound.job
            return job is None or (not inbound.owned and is_cancellable(job.phase))

        self.tasks.spawn(self._serve(h, holder), f"inbound:{self._conns}:{peer}", cancellable=cancellable)

    async def _serve(self, h: _Handshake, holder: dict) -> None:
        conn = FrameProtocol(MigrationSession(Role.DESTINATION))
        conn.max_body_bytes = PRE_AUTH_MAX_BODY
        conn.refuse_silently = self.ssl_context is not None
        conn.gate = h
        h.conn = conn
        handed = False
        try:
            if h.done:                                  # evicted before it started
                return
            kind = await self._peek_kind(h)
            if kind == "closed":
                return
            if kind == "data":
                handed = True
                await self._data_stream(h)
                return
            handed = True
            if not await self._attach(h, conn):
                return
            if h.done:                                  # dropped as TLS finished
                conn.close()
                return
            inbound = holder["inbound"] = DestinationMigration(self.host, conn)
            await inbound.run()
        finally:
            self.gate.closed(h)
            if not handed:
                h.sock.close()

    async def _peek_kind(self, h: _Handshake) -> str:
        """"data" (the magic of a data stream), "control" or "closed", from
        the first bytes, peeked: a control connection's bytes stay unread."""
        loop = asyncio.get_running_loop()
        magic, fd = DATA_STREAM_MAGIC, h.sock.fileno()
        while not h.done:
            try:
                head = h.sock.recv(len(magic), socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                ready = loop.create_future()
                loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
                continue
            except OSError:
                return "closed"
            if not head:
                return "closed"
            if not magic.startswith(head):
                return "control"
            if len(head) == len(magic):
                return "data"
            # A part of the magic: the rest follows in the next segment (the
            # gate's timeout bounds a peer that never sends it).
            await asyncio.sleep(0.005)
        return "closed"

    async def _data_stream(self, h: _Handshake) -> None:
        """TLS and Join in a thread; then hand it to the migration it names."""
        loop = asyncio.get_running_loop()

        def tls_done() -> None:                   # in the thread: a verified certificate
            loop.call_soon_threadsafe(lambda: h.done or h.authenticated())

        # The thread's socket is wrapped by TLS (which detaches it); the gate
        # keeps a duplicate, so a drop (timeout, eviction) can still shut the
        # connection down and end the thread's handshake.
        theirs = h.sock
        try:
            h.sock = theirs.dup()
        except OSError:
            theirs.close()
            return
        try:
            sock, join, session, peer_name = await _in_own_thread(
                datastream.accept_data_stream, theirs, self.ssl_context, self.gate.timeout_s, tls_done)
        except (ssl.SSLError, OSError, ProtocolError, PeerLost, tls.PeerIdentityError, ValueError,
                RuntimeError) as exc:
            if not h.dropped:
                self.gate.throttle.warning("peer_refused", peer=h.peer, stage="data-stream",
                                           reason=f"{getattr(exc, 'reason', None) or exc}")
            theirs.close()
            return
        finally:
            h.sock.close()                        # the gate's duplicate
        if h.dropped:                             # dropped while its thread finished: not admitted
            sock.close()
            return
        self.gate._leave(h)
        streams = self.host.inbound_streams.get(join.migration_id)
        why = "no migration here waits for it" if streams is None else streams.admit(join, sock, session, peer_name)
        if why is not None:
            self.gate.throttle.warning("peer_refused", peer=h.peer, stage="data-stream",
                                       migration_id=join.migration_id, reason=why)
            sock.close()
            return
        log.info("data_stream_joined", peer=h.peer, migration_id=join.migration_id, stream=join.stream)

    async def _attach(self, h: _Handshake, conn: FrameProtocol) -> bool:
        """Put ``conn`` on the socket, through mutual TLS if configured. False: refused (logged)."""
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: conn, h.sock, ssl=self.ssl_context,
                ssl_handshake_timeout=self.gate.timeout_s if self.ssl_context is not None else None)
        except (ssl.SSLError, OSError, TimeoutError, RuntimeError) as exc:
            if not h.dropped:                           # a drop is logged already
                self.gate.throttle.warning("peer_refused", peer=h.peer,
                                           reason=f"TLS handshake failed: {getattr(exc, 'reason', None) or exc!r}")
            return False
        if self.ssl_context is not None:
            try:
                conn.peer_name = tls.peer_identity(transport.get_extra_info("ssl_object"))
            except tls.PeerIdentityError as exc:
                self.gate.throttle.warning("peer_refused", peer=h.peer, reason=str(exc))
                transport.abort()
                return False
        return True

    def close(self) -> None:
        """Accept no new connection (those under way go on)."""
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def shutdown(self, grace_s: float) -> None:
        self.close()
        await self.tasks.shutdown(grace_s)
