"""Handshake helpers: capability negotiation and HMAC mutual authentication.

Pure functions; the agent calls them around the Hello/Welcome/Auth messages::

    SOURCE (client)                               DESTINATION (server)
    Hello(version_min..max, features, nonce=cn) ->
                                                  negotiate(local, remote)
                                <- Welcome(version, features, slots, nonce=sn,
                                           proof=auth_proof(key, "server", cn, sn) or b"")
    check_proof(key, "server", cn, sn, proof)
    Auth(proof=auth_proof(key, "client", cn, sn)) ->
                                                  check_proof(key, "client", cn, sn, proof)
                                                  (bad proof -> Reject(AUTH_FAILED))

The role string is part of the MAC, so a proof cannot be reflected back.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Final, Literal

from .errors import LocalProtocolError, NegotiationFailed
from .messages import Hello, Welcome
from .wire import NONCE_BYTES, ErrorCode

__all__ = [
    "FEATURES",
    "Capabilities",
    "Agreement",
    "negotiate",
    "accept_welcome",
    "make_nonce",
    "auth_proof",
    "check_proof",
]

#: Features this implementation understands.
FEATURES: Final[frozenset[str]] = frozenset(
    {"zero-pages", "digests-xxh3-128", "auth-hmac-sha256"}
)

_ROLES: Final = frozenset({"server", "client"})


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What one side offers."""

    version_min: int
    version_max: int
    features: frozenset[str]
    max_live_migrations: int

    def __post_init__(self) -> None:
        if self.version_min > self.version_max:
            raise LocalProtocolError(
                f"version_min {self.version_min} > version_max {self.version_max}"
            )
        if self.max_live_migrations < 1:
            raise LocalProtocolError("max_live_migrations must be >= 1")
        if type(self.features) is not frozenset:
            object.__setattr__(self, "features", frozenset(self.features))

    @classmethod
    def from_hello(cls, hello: Hello) -> Capabilities:
        """The source's offer, as carried by its Hello."""
        return cls(
            version_min=hello.version_min,
            version_max=hello.version_max,
            features=frozenset(hello.features),
            max_live_migrations=hello.max_live_migrations,
        )


@dataclass(frozen=True, slots=True)
class Agreement:
    """What both sides will use on this connection."""

    version: int
    features: frozenset[str]
    slots: int


def _range(caps: Capabilities) -> str:
    if caps.version_min == caps.version_max:
        return str(caps.version_min)
    return f"{caps.version_min}..{caps.version_max}"


def negotiate(local: Capabilities, remote: Capabilities) -> Agreement:
    """Highest common version, common features, ``slots = min`` of both.

    Raises ``NegotiationFailed(VERSION_MISMATCH)`` naming both ranges when the
    version ranges do not overlap.
    """
    low = max(local.version_min, remote.version_min)
    high = min(local.version_max, remote.version_max)
    if low > high:
        raise NegotiationFailed(
            f"no common protocol version: local offers {_range(local)}, "
            f"remote offers {_range(remote)}",
            ErrorCode.VERSION_MISMATCH,
        )
    return Agreement(
        version=high,
        features=local.features & remote.features,
        slots=min(local.max_live_migrations, remote.max_live_migrations),
    )


def accept_welcome(local: Capabilities, welcome: Welcome) -> Agreement:
    """Source side: check the destination's choice against our offer.

    The destination ran ``negotiate``; its Welcome must pick a version in our
    range and may not grant more slots than we offered.  Unknown features in
    the Welcome are ignored (intersected away).
    """
    if not local.version_min <= welcome.version <= local.version_max:
        raise NegotiationFailed(
            f"peer chose protocol version {welcome.version}, "
            f"local offers {_range(local)}",
            ErrorCode.VERSION_MISMATCH,
        )
    if welcome.slots > local.max_live_migrations:
        raise NegotiationFailed(
            f"peer granted {welcome.slots} slots, local offers {local.max_live_migrations}",
            ErrorCode.INCOMPATIBLE,
        )
    return Agreement(
        version=welcome.version,
        features=local.features & frozenset(welcome.features),
        slots=welcome.slots,
    )


def make_nonce() -> bytes:
    """A fresh random handshake nonce (``NONCE_BYTES`` bytes)."""
    return os.urandom(NONCE_BYTES)


def auth_proof(
    key: bytes,
    role: Literal["server", "client"],
    client_nonce: bytes,
    server_nonce: bytes,
) -> bytes:
    """HMAC-SHA256(key, b"livemig-" + role + b"\\0" + client_nonce + server_nonce)."""
    if not isinstance(key, bytes) or not key:
        raise LocalProtocolError("auth key must be non-empty bytes", ErrorCode.AUTH_FAILED)
    if role not in _ROLES:
        raise LocalProtocolError(f"role must be 'server' or 'client', not {role!r}")
    for name, nonce in (("client_nonce", client_nonce), ("server_nonce", server_nonce)):
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
            raise LocalProtocolError(f"{name} must be {NONCE_BYTES} bytes")
    message = b"livemig-" + role.encode("ascii") + b"\0" + client_nonce + server_nonce
    return hmac.new(key, message, hashlib.sha256).digest()


def check_proof(
    key: bytes,
    role: Literal["server", "client"],
    client_nonce: bytes,
    server_nonce: bytes,
    proof: bytes,
) -> None:
    """Raise ``NegotiationFailed(AUTH_FAILED)`` unless ``proof`` is right.

    Constant-time comparison (``hmac.compare_digest``).
    """
    expected = auth_proof(key, role, client_nonce, server_nonce)
    if not isinstance(proof, bytes) or not hmac.compare_digest(expected, proof):
        raise NegotiationFailed(
            f"authentication failed: bad {role} proof (keys differ?)", ErrorCode.AUTH_FAILED
        )
