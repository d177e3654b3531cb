"""Protocol errors (h11 ``_util.py`` / wsproto / h2 style).

``ProtocolError`` is abstract.  ``LocalProtocolError`` means *we* broke the
rules (sent a message not allowed now, built an invalid message);
``RemoteProtocolError`` means the peer did.  Every error carries the
``ErrorCode`` to answer with, so the agent can send ``Abort(code=exc.code)``
and close (STYLE 2.9 rule 6).

Inside the package, validation raises ``LocalProtocolError``; the decoder
converts it to ``RemoteProtocolError(MALFORMED)`` at the one input boundary.
"""

from __future__ import annotations

from .wire import ErrorCode

__all__ = [
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "NegotiationFailed",
]


class ProtocolError(Exception):
    """Base of all protocol errors.  Abstract: raise a subclass.

    Attributes:
        code: the ``ErrorCode`` to put in an ``Abort``/``Reject`` answer.
        reason: human-readable text (``== str(exc)``).
    """

    code: ErrorCode
    reason: str

    def __init__(self, reason: str, code: ErrorCode) -> None:
        if type(self) is ProtocolError:
            raise TypeError(
                "tried to directly instantiate ProtocolError; use "
                "LocalProtocolError or RemoteProtocolError"
            )
        super().__init__(reason)
        self.reason = reason
        self.code = ErrorCode(code)

    def __str__(self) -> str:
        return self.reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, code={self.code.name})"

    def __reduce__(self):  # keep pickling (e.g. across executors) working
        return (type(self), (self.reason, self.code))


class LocalProtocolError(ProtocolError):
    """We misused the protocol (our bug, or an invalid message we built)."""

    def __init__(self, reason: str, code: ErrorCode = ErrorCode.UNEXPECTED) -> None:
        super().__init__(reason, code)


class RemoteProtocolError(ProtocolError):
    """The peer misbehaved; answer with ``Abort(code=exc.code)`` and close."""

    def __init__(self, reason: str, code: ErrorCode = ErrorCode.MALFORMED) -> None:
        super().__init__(reason, code)


class NegotiationFailed(RemoteProtocolError):
    """No common ground with the peer (versions) or its proof was wrong.

    The reason names both offers, as asyncssh's ``_choose_alg`` does.
    """

    def __init__(
        self, reason: str, code: ErrorCode = ErrorCode.VERSION_MISMATCH
    ) -> None:
        super().__init__(reason, code)
