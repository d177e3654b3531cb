"""Server side of the handshake: Hello -> Welcome (or Reject) -> Auth, then
the first request of the connection (Prepare or Query). The client side is
``agent.net.peer.open_session``. Nothing of a migration (slot, memory, name,
file) exists before this returns an authenticated request.

With TLS the endpoint has already completed mutual TLS (the peer holds a
certificate from the cluster CA); here the name in that certificate must
be the name in the Hello, or the connection is closed without an answer
(a generic refusal: nothing tells the peer which check failed). Only then
is the peer authenticated (``conn.gate.authenticated()``: full-size frames
from here on), and a Prepare still needs a place under
``limits.max_connections`` (``conn.gate.admit``); a Query never waits for one.

The HMAC challenge (``migration.auth_key_file``) still runs when both sides
have a key, in either mode; under TLS it adds nothing and is meant for
``security.mode = "insecure"`` labs."""
from __future__ import annotations

from dataclasses import dataclass

from protocol import (
    Agreement,
    Auth,
    Capabilities,
    ErrorCode,
    Hello,
    Message,
    Prepare,
    ProtocolError,
    Query,
    Reject,
    RemoteProtocolError,
    Welcome,
    auth_proof,
    check_proof,
    make_nonce,
    negotiate,
)

from agent.daemon.host import Host
from agent.errors import AdmissionRefused, PeerLost
from agent.net.peer import AUTH_FEATURE
from agent.net.transport import FrameProtocol
from agent.observe.logs import get_logger

log = get_logger("livemig.accept")

REASON_CHARS = 1000


@dataclass(frozen=True)
class Accepted:
    hello: Hello
    agreement: Agreement
    request: Message          # Prepare or Query


async def accept(host: Host, conn: FrameProtocol) -> Accepted | None:
    """Run the server side of the handshake. None: answered and done (a
    refusal, a failed proof, or a probe that closed after Welcome)."""
    t = host.cfg.migration.handshake_timeout_s
    hello = await conn.expect(Hello, t)
    if conn.peer_name is not None and hello.agent != conn.peer_name:
        log.warning("peer_refused", peer=conn.peer,
                    reason=f"certificate names {conn.peer_name!r} but Hello says {hello.agent!r}")
        conn.close()
        return None
    agreement = await _agree(host, conn, hello)
    if agreement is None:
        return None
    if conn.gate is not None:
        conn.gate.authenticated()
    try:
        msg = await conn.recv(t)
    except PeerLost:
        log.debug("probe_answered", peer=conn.peer, source_agent=hello.agent)   # Hello/Welcome/close
        return None
    if not isinstance(msg, (Prepare, Query)):   # the session admits nothing else here
        raise RemoteProtocolError(f"unexpected {type(msg).__name__}", ErrorCode.UNEXPECTED)
    if conn.gate is not None and not conn.gate.admit(msg):
        limit = host.cfg.limits.max_connections
        log.warning("connection_refused_limit", peer=conn.peer, source_agent=hello.agent, limit=limit)
        await conn.send(Reject(code=ErrorCode.BUSY, reason=f"{limit} migration connections already open"))
        return None
    return Accepted(hello, agreement, msg)


async def _agree(host: Host, conn: FrameProtocol, hello: Hello) -> Agreement | None:
    """Negotiate, answer Welcome (or Reject) and check the source's Auth."""
    caps = host.capabilities()
    features = caps.features if host.auth_key else caps.features - {AUTH_FEATURE}
    local = Capabilities(caps.version_min, caps.version_max, frozenset(features), caps.max_live_migrations)
    remote = Capabilities(hello.version_min, hello.version_max, frozenset(hello.features), hello.max_live_migrations)
    try:
        agreement = negotiate(local, remote)
        if host.auth_key and AUTH_FEATURE not in agreement.features:
            raise AdmissionRefused("this agent requires authentication (migration.auth_key_file)", ErrorCode.AUTH_FAILED)
    except (ProtocolError, AdmissionRefused) as exc:
        await conn.send(Reject(code=ErrorCode(exc.code), reason=str(exc)[:REASON_CHARS]))
        return None
    nonce = make_nonce()
    proof = auth_proof(host.auth_key, "server", hello.nonce, nonce) if AUTH_FEATURE in agreement.features else b""
    if proof:   # before Welcome goes out: the source's Auth may arrive at once
        conn.session.set_auth_required(True)
    await conn.send(Welcome(
        version=agreement.version, agent=host.name, features=tuple(sorted(agreement.features)),
        max_live_migrations=caps.max_live_migrations, slots=agreement.slots, nonce=nonce, proof=proof,
        slots_free=max(0, host.slots.limit - host.slots.in_use), memory_free_bytes=host.memory_available(),
        status="maintenance" if host.maintenance else "accepting",
    ))
    if proof:
        auth = await conn.expect(Auth, host.cfg.migration.handshake_timeout_s)
        try:
            check_proof(host.auth_key, "client", hello.nonce, nonce, auth.proof)
        except ProtocolError as exc:
            await conn.send(Reject(code=exc.code, reason="authentication failed"))
            return None
    return agreement
