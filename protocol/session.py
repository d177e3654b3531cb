"""Per-connection message-order enforcement (h11 ``_state.py`` style).

The IO layer decodes frames itself (``parse_prefix``/``decode_body``, payloads
straight into guest memory), so a ``MigrationSession`` only sees ``Message``
objects: ``send(msg) -> bytes`` for ours, ``receive(msg)`` for the peer's.

Rules:

1. Every legal move is one entry of ``TRANSITIONS``, keyed by
   ``(sender role, state, MsgType)``.  Both ends of a connection use the same
   table, so a SOURCE and a DESTINATION fed each other's messages stay in the
   same state.  Nothing else assigns the state.
2. One state-triggered rule: ``AUTH`` is skipped (becomes ``IDLE``) when auth is
   not required.  ``set_auth_required`` may change the decision until the
   first message after Welcome.
3. ``Ready``/``Resume``/``Commit`` must carry the ``migration_id`` of the
   ``Prepare``; ``QueryResult`` that of the ``Query``. A data stream's
   ``Join`` sets it too (nothing later on a data stream carries one).
4. A message not in the table: ``send`` raises ``LocalProtocolError``,
   ``receive`` raises ``RemoteProtocolError(UNEXPECTED)``; either way the
   session moves to ``ERROR`` and every later ``send``/``receive`` raises.
   To tell the peer why, send ``encode_frame(Abort(code=exc.code, ...))``
   directly (it needs no session) and close.

The conversation (S = SOURCE, connects; D = DESTINATION, accepts)::

    HELLO      --S Hello-->         WELCOME
    WELCOME    --D Welcome-->       AUTH (IDLE if auth not required)
    WELCOME    --D Reject-->        CLOSED
    AUTH       --S Auth-->          IDLE
    IDLE       --D Reject-->        CLOSED      (bad Auth proof)
    IDLE       --S Query-->         QUERYING    --D QueryResult | Reject--> CLOSED
    IDLE       --S Prepare-->       PREPARING   --D Reject--> CLOSED
    PREPARING  --D Ready-->         TRANSFER
    TRANSFER   --S RoundEnd-->      TRANSFER
    TRANSFER   --D RoundAck-->      TRANSFER      (the round's pages are in memory;
                                                   also seen late in SWITCHOVER/RESUMING)
    TRANSFER   --S SectionState-->  TRANSFER
    TRANSFER   --S StateTransfer--> SWITCHOVER
    SWITCHOVER --D Digests-->       SWITCHOVER       (one per section, guest still paused)
    SWITCHOVER --S Resume-->        RESUMING         (or S Abort: verification failed)
    RESUMING   --D Resumed-->       COMMITTING
    COMMITTING --S Commit-->        COMMIT_SENT
    COMMIT_SENT --D Committed-->    CLOSED
    any state from AUTH to COMMIT_SENT --S or D Abort--> CLOSED

A data stream (protocol v3) is a connection of its own that begins with
DATA_STREAM_MAGIC, then TLS, then Join instead of Hello; it carries the
pages, never the control messages::

    HELLO      --S Join-->          DATA
    DATA       --S PageBatch | RoundEnd--> DATA     (RoundEnd: this stream's
                                                   part of the round is sent)
    DATA       --S or D Abort-->    CLOSED

Pages never travel on the control connection: a page is always sent on the
data stream of its chunk, so a newer copy can never overtake an older one,
and the control stream's RoundEnd/StateTransfer are acted on only once
every data stream has delivered its own RoundEnd of that round.

Verification comes before resume (protocol v2): the destination's guest
starts only on Resume, and the source sends Resume only after every
section's digests matched its frozen copy. A lost Abort therefore cannot
make the destination run memory known to be wrong: without Resume it
discards on EOF or timeout.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .framing import encode_frame
from .messages import Message
from .wire import ErrorCode, MsgType

__all__ = [
    "Role",
    "SessionState",
    "TRANSITIONS",
    "ABORTABLE_STATES",
    "MigrationSession",
]


class Role(enum.Enum):
    """Which end of the connection we are."""

    #: the connecting side, sends the guest
    SOURCE = "source"
    #: the accepting side, receives the guest
    DESTINATION = "destination"

    @property
    def peer(self) -> Role:
        """The other end."""
        return Role.DESTINATION if self is Role.SOURCE else Role.SOURCE


class SessionState(enum.Enum):
    """Where the conversation is (same value on both ends)."""

    #: nothing sent yet; SOURCE sends Hello
    HELLO = "hello"
    #: Hello sent; DESTINATION answers Welcome or Reject
    WELCOME = "welcome"
    #: Welcome sent, auth required; SOURCE sends Auth
    AUTH = "auth"
    #: handshake done; SOURCE sends Prepare or Query
    IDLE = "idle"
    #: Prepare sent; DESTINATION answers Ready or Reject
    PREPARING = "preparing"
    #: SOURCE sends RoundEnd (its pages travel on data streams), then StateTransfer
    TRANSFER = "transfer"
    #: StateTransfer sent; DESTINATION sends Digests, SOURCE then Resume
    SWITCHOVER = "switchover"
    #: Resume sent; DESTINATION answers Resumed
    RESUMING = "resuming"
    #: Resumed sent; SOURCE sends Commit
    COMMITTING = "committing"
    #: Commit sent; DESTINATION answers Committed
    COMMIT_SENT = "commit-sent"
    #: Query sent; DESTINATION answers QueryResult or Reject
    QUERYING = "querying"
    #: a data stream after Join: SOURCE sends PageBatch/RoundEnd
    DATA = "data"
    #: conversation over (Committed, QueryResult, Reject or Abort)
    CLOSED = "closed"
    #: a bad send/receive happened; the session refuses further use
    ERROR = "error"


_S: Final = Role.SOURCE
_D: Final = Role.DESTINATION
_St = SessionState
_T = MsgType

#: States in which either side may send Abort (after Welcome, before CLOSED).
ABORTABLE_STATES: Final = frozenset(
    {
        _St.AUTH,
        _St.IDLE,
        _St.QUERYING,
        _St.PREPARING,
        _St.TRANSFER,
        _St.SWITCHOVER,
        _St.RESUMING,
        _St.COMMITTING,
        _St.COMMIT_SENT,
        _St.DATA,
    }
)

#: The only source of truth: (sender, state, message type) -> next state.
TRANSITIONS: Final[Mapping[tuple[Role, SessionState, MsgType], SessionState]] = {
    (_S, _St.HELLO, _T.HELLO): _St.WELCOME,
    (_D, _St.WELCOME, _T.WELCOME): _St.AUTH,  # -> IDLE if auth not required
    (_D, _St.WELCOME, _T.REJECT): _St.CLOSED,
    (_S, _St.AUTH, _T.AUTH): _St.IDLE,
    (_D, _St.IDLE, _T.REJECT): _St.CLOSED,  # answer to a bad Auth proof
    (_S, _St.IDLE, _T.QUERY): _St.QUERYING,
    (_D, _St.QUERYING, _T.QUERY_RESULT): _St.CLOSED,
    (_D, _St.QUERYING, _T.REJECT): _St.CLOSED,
    (_S, _St.IDLE, _T.PREPARE): _St.PREPARING,
    (_D, _St.PREPARING, _T.READY): _St.TRANSFER,
    (_D, _St.PREPARING, _T.REJECT): _St.CLOSED,
    (_S, _St.TRANSFER, _T.ROUND_END): _St.TRANSFER,
    (_S, _St.HELLO, _T.JOIN): _St.DATA,
    (_S, _St.DATA, _T.PAGE_BATCH): _St.DATA,
    (_S, _St.DATA, _T.ROUND_END): _St.DATA,
    (_D, _St.TRANSFER, _T.ROUND_ACK): _St.TRANSFER,
    # The destination acks in TRANSFER, but the source may already have sent
    # StateTransfer/Resume when the ack of its last round arrives.
    (_D, _St.SWITCHOVER, _T.ROUND_ACK): _St.SWITCHOVER,
    (_D, _St.RESUMING, _T.ROUND_ACK): _St.RESUMING,
    (_S, _St.TRANSFER, _T.SECTION_STATE): _St.TRANSFER,
    (_S, _St.TRANSFER, _T.STATE_TRANSFER): _St.SWITCHOVER,
    # Verification before resume: the destination sends one Digests per
    # section while its guest is still paused; the source compares with its
    # frozen copy and sends Resume only when every section matched.
    (_D, _St.SWITCHOVER, _T.DIGESTS): _St.SWITCHOVER,
    (_S, _St.SWITCHOVER, _T.RESUME): _St.RESUMING,
    (_D, _St.RESUMING, _T.RESUMED): _St.COMMITTING,
    (_S, _St.COMMITTING, _T.COMMIT): _St.COMMIT_SENT,
    (_D, _St.COMMIT_SENT, _T.COMMITTED): _St.CLOSED,
    **{
        (role, state, _T.ABORT): _St.CLOSED
        for role in Role
        for state in sorted(ABORTABLE_STATES, key=lambda s: s.value)
    },
}

#: Messages whose migration_id must equal the one set by Prepare/Query.
_SAME_ID: Final = frozenset({_T.READY, _T.RESUME, _T.COMMIT, _T.QUERY_RESULT})
_SETS_ID: Final = frozenset({_T.PREPARE, _T.QUERY, _T.JOIN})
_AUTH_WINDOW: Final = frozenset({_St.HELLO, _St.WELCOME, _St.AUTH, _St.IDLE})


class MigrationSession:
    """Enforces who may send what, when, on one connection.

    Usage (source side)::

        session = MigrationSession(Role.SOURCE)
        writer.write(session.send(hello))
        welcome = session.receive(decode_body(prefix, body))
    """

    __slots__ = ("_role", "_state", "_auth_required", "_auth_open", "_migration_id")

    def __init__(self, role: Role, *, auth_required: bool = False) -> None:
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, not {role!r}")
        self._role = role
        self._state = SessionState.HELLO
        self._auth_required = bool(auth_required)
        self._auth_open = True  # set_auth_required still allowed
        self._migration_id: str | None = None

    def __repr__(self) -> str:
        return (
            f"<MigrationSession role={self._role.value} state={self._state.name} "
            f"migration_id={self._migration_id!r}>"
        )

    @property
    def role(self) -> Role:
        return self._role

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def auth_required(self) -> bool:
        return self._auth_required

    @property
    def migration_id(self) -> str | None:
        """The id from the Prepare (or Query) of this connection, once seen."""
        return self._migration_id

    def allowed_to_send(self) -> frozenset[MsgType]:
        """Message types we may send now."""
        return self._allowed(self._role)

    def allowed_to_receive(self) -> frozenset[MsgType]:
        """Message types the peer may send now."""
        return self._allowed(self._role.peer)

    def _allowed(self, sender: Role) -> frozenset[MsgType]:
        state = self._state
        return frozenset(t for (r, s, t) in TRANSITIONS if r is sender and s is state)

    def set_auth_required(self, flag: bool) -> None:
        """Decide whether the AUTH step is used.

        Allowed until the first message after Welcome; if Welcome was already
        seen, moves between ``AUTH`` and ``IDLE`` accordingly.
        """
        if not self._auth_open or self._state not in _AUTH_WINDOW:
            raise LocalProtocolError(
                f"auth decision already taken (state {self._state.name})"
            )
        self._auth_required = bool(flag)
        if self._state in (SessionState.AUTH, SessionState.IDLE):
            self._state = SessionState.AUTH if flag else SessionState.IDLE

    def send(self, msg: Message) -> bytes:
        """Check that we may send ``msg`` now; return its frame; advance.

        Raises ``LocalProtocolError`` (and moves to ``ERROR``) otherwise.
        """
        if self._state is SessionState.ERROR:
            raise LocalProtocolError("cannot send: session is in ERROR state")
        try:
            new = self._next_state(self._role, msg, LocalProtocolError)
            data = encode_frame(msg)
        except ProtocolError:
            self._set_error()
            raise
        self._advance(msg, new)
        return data

    def receive(self, msg: Message) -> Message:
        """Check that the peer may send ``msg`` now; advance; return it.

        Raises ``RemoteProtocolError(UNEXPECTED)`` (and moves to ``ERROR``)
        otherwise.
        """
        if self._state is SessionState.ERROR:
            raise RemoteProtocolError(
                "cannot receive: session is in ERROR state", ErrorCode.UNEXPECTED
            )
        try:
            new = self._next_state(self._role.peer, msg, RemoteProtocolError)
        except ProtocolError:
            self._set_error()
            raise
        self._advance(msg, new)
        return msg

    def _next_state(
        self,
        sender: Role,
        msg: Message,
        error: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> SessionState:
        if not isinstance(msg, Message):
            raise LocalProtocolError(f"not a protocol message: {type(msg).__name__}")
        state = self._state
        new = TRANSITIONS.get((sender, state, msg.TYPE))
        if new is None:
            raise error(
                f"{sender.value} may not send {type(msg).__name__} in state {state.name}",
                ErrorCode.UNEXPECTED,
            )
        if msg.TYPE in _SAME_ID and msg.migration_id != self._migration_id:  # type: ignore[attr-defined]
            raise error(
                f"{type(msg).__name__} for migration {msg.migration_id!r}, "  # type: ignore[attr-defined]
                f"this connection carries {self._migration_id!r}",
                ErrorCode.UNEXPECTED,
            )
        return new

    def _advance(self, msg: Message, new: SessionState) -> None:
        msg_type = msg.TYPE
        if msg_type in _SETS_ID:
            self._migration_id = msg.migration_id  # type: ignore[attr-defined]
        self._auth_open = msg_type is MsgType.HELLO or msg_type is MsgType.WELCOME
        if new is SessionState.AUTH and not self._auth_required:
            new = SessionState.IDLE
        self._state = new

    def _set_error(self) -> None:
        self._state = SessionState.ERROR
        self._auth_open = False
