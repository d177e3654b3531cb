"""Client side of the handshake, shared by migrations and queries.

With ``security.mode = "tls"`` the connection is mutual TLS 1.3 first
(``agent.net.tls``); the destination is named by address, so what proves
who answered is its certificate: the name in it must be the name in its
Welcome, or the session ends before anything about a VM is sent."""
from __future__ import annotations

from protocol import (
    Auth,
    Capabilities,
    Hello,
    MigrationSession,
    Reject,
    Role,
    Welcome,
    accept_welcome,
    auth_proof,
    check_proof,
    make_nonce,
)

from protocol import ErrorCode

from agent.errors import PeerError
from agent.daemon.host import Host
from agent.net import tls
from agent.net.transport import FrameProtocol, connect

AUTH_FEATURE = "auth-hmac-sha256"


async def open_session(host: Host, peer_host: str, peer_port: int):
    """Connect, say Hello, check Welcome (and authenticate). Returns (conn, agreement, welcome)."""
    cfg = host.cfg.migration
    session = MigrationSession(Role.SOURCE)
    sec = host.cfg.security
    ctx = tls.client_context(sec) if sec.tls else None
    conn: FrameProtocol = await connect(peer_host, peer_port, session, cfg.handshake_timeout_s, ctx)
    try:
        caps = host.capabilities()
        nonce = make_nonce()
        features = caps.features if host.auth_key else caps.features - {AUTH_FEATURE}
        await conn.send(
            Hello(
                version_min=caps.version_min,
                version_max=caps.version_max,
                agent=host.name,
                features=tuple(sorted(features)),
                max_live_migrations=caps.max_live_migrations,
                nonce=nonce,
            )
        )
        reply = await conn.recv(cfg.handshake_timeout_s)
        if isinstance(reply, Reject):
            raise PeerError(f"{peer_host}:{peer_port} refused: {reply.reason}", int(reply.code))
        if not isinstance(reply, Welcome):     # the session admits only Welcome or Reject here
            raise PeerError(f"{peer_host}:{peer_port} answered Hello with {type(reply).__name__}")
        if conn.peer_name is not None and reply.agent != conn.peer_name:
            raise PeerError(f"{peer_host}:{peer_port} says it is agent {reply.agent!r} but its certificate "
                            f"names {conn.peer_name!r}", int(ErrorCode.AUTH_FAILED))
        local = Capabilities(caps.version_min, caps.version_max, frozenset(features), caps.max_live_migrations)
        agreement = accept_welcome(local, reply)
        if AUTH_FEATURE in agreement.features:
            check_proof(host.auth_key, "server", nonce, reply.nonce, reply.proof)
            session.set_auth_required(True)
            await conn.send(Auth(proof=auth_proof(host.auth_key, "client", nonce, reply.nonce)))
        elif host.auth_key:
            raise PeerError(f"{peer_host}:{peer_port} does not authenticate and this agent requires it")
        return conn, agreement, reply
    except BaseException:
        conn.close()
        raise
