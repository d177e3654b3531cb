"""Protocol messages: one frozen, slotted, kw-only dataclass per ``MsgType``.

An invalid message cannot exist: each class validates its fields in
``__post_init__`` (exact types -- ``bool`` is not an ``int`` --, ranges,
lengths) and raises ``LocalProtocolError``.  ``from_body`` is the input
boundary: it is strict (unknown keys, missing keys, wrong types) and turns
every validation failure into ``RemoteProtocolError(MALFORMED)``.

Body encoding (msgpack map, keys are the field names)::

    int                      -> msgpack int (0 .. 2**64-1)
    str                      -> msgpack str (<= MAX_STRING UTF-8 bytes)
    bytes                    -> msgpack bin
    tuple[str, ...]          -> msgpack array of str (decoded back to a tuple)
    ErrorCode / BatchFlags   -> msgpack int (decoded back to the enum)
    PageBatch.runs           -> flat int array [first0, count0, first1, ...]

Worked ``PageBatch`` example (pages 3,4 and 9 of guest RAM, round 2)::

    PageBatch(section=0, round=2, runs=((3, 2), (9, 1)), flags=BatchFlags.NONE,
              payload_len=3 * 4096)
    body    {"section": 0, "round": 2, "runs": [3, 2, 9, 1], "flags": 0, "payload_len": 12288}
    payload | page 3 | page 4 | page 9 |   (raw, after the frame, not msgpack)

With ``flags=ZERO`` the same runs announce zero pages and ``payload_len`` is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from itertools import chain, repeat
from operator import add
from typing import Any, ClassVar, Final, Self, TypeVar

from .errors import LocalProtocolError, RemoteProtocolError
from .wire import (
    DIGEST_BYTES,
    MAX_BATCH_PAGES,
    MAX_BATCH_RUNS,
    MAX_FEATURES,
    MAX_FRAME_BYTES,
    MAX_ID_CHARS,
    MAX_STRING,
    NONCE_BYTES,
    MAX_STREAMS,
    PAGE_SIZE,
    PROOF_BYTES,
    U64_MAX,
    BatchFlags,
    ErrorCode,
    MsgType,
)

__all__ = [
    "Message",
    "Hello",
    "Welcome",
    "Auth",
    "Reject",
    "Prepare",
    "Ready",
    "PageBatch",
    "RoundEnd",
    "StateTransfer",
    "Digests",
    "Resume",
    "Resumed",
    "Commit",
    "Committed",
    "Query",
    "QueryResult",
    "Abort",
    "RoundAck",
    "SectionState",
    "Join",
    "QUERY_STATES",
    "VERIFY_MODES",
    "MAX_SECTIONS",
    "REGISTRY",
    "MAX_BLOB_BYTES",
    "WELCOME_STATUSES",
]

#: Room left in a body for the map header, keys and bin headers around the
#: blobs of a ``StateTransfer``/``Digests`` (the real overhead is < 40 bytes).
_BODY_OVERHEAD: Final = 64
#: Largest bytes field (and, for StateTransfer, the sum of both blobs).
MAX_BLOB_BYTES: Final = MAX_FRAME_BYTES - _BODY_OVERHEAD

_ERROR_CODES: Final = frozenset(int(c) for c in ErrorCode)
#: What a Welcome may say of the destination.
WELCOME_STATUSES: Final = frozenset({"accepting", "maintenance"})
#: What a QueryResult may say of a migration id: the destination runs the VM
#: (a copy verified before it resumed: since v2 nothing else ever runs),
#: had it and discarded it, is still deciding, or never heard of it.
QUERY_STATES: Final = frozenset({"running", "discarded", "in-progress", "unknown"})
#: How memory is proven equal before the destination resumes.
VERIFY_MODES: Final = frozenset({"incremental", "full"})
#: Sections per migration (RAM, disks, device state...); also bounded by MAX_FEATURES
#: as a tuple of names in Prepare (both 64).
MAX_SECTIONS: Final = 64

_KNOWN_FLAGS: Final = int(BatchFlags.ZERO)

# Field kinds, derived from the dataclass annotations by ``_register``.
_INT, _STR, _BYTES, _STRS, _CODE, _FLAGS, _RUNS = range(7)
_KIND_OF_ANNOTATION: Final = {
    "int": _INT,
    "str": _STR,
    "bytes": _BYTES,
    "tuple[str, ...]": _STRS,
    "ErrorCode": _CODE,
    "BatchFlags": _FLAGS,
    "tuple[tuple[int, int], ...]": _RUNS,
}


def _fail(msg: Message, reason: str) -> LocalProtocolError:
    return LocalProtocolError(f"invalid {type(msg).__name__}: {reason}", ErrorCode.MALFORMED)


def _check_int(msg: Message, name: str, value: object, minimum: int = 0) -> None:
    if type(value) is not int:  # exact: rejects bool and IntEnum
        raise _fail(msg, f"{name} must be int, got {type(value).__name__}")
    if not minimum <= value <= U64_MAX:
        raise _fail(msg, f"{name}={value} out of range {minimum}..2**64-1")


def _check_str(msg: Message, name: str, value: object) -> None:
    if type(value) is not str:
        raise _fail(msg, f"{name} must be str, got {type(value).__name__}")
    if len(value) * 4 > MAX_STRING:  # cheap path: short strings always fit
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise _fail(msg, f"{name} is not valid UTF-8 text") from None
        if size > MAX_STRING:
            raise _fail(msg, f"{name} is {size} bytes, limit {MAX_STRING}")
    elif not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _fail(msg, f"{name} is not valid UTF-8 text") from None


def _check_id(msg: Message, name: str, value: str) -> None:
    if not 1 <= len(value) <= MAX_ID_CHARS:
        raise _fail(msg, f"{name} must be 1..{MAX_ID_CHARS} characters")


def _check_section(msg: Message, value: int) -> None:
    if value >= MAX_SECTIONS:
        raise _fail(msg, f"section={value} out of range 0..{MAX_SECTIONS - 1}")


def _check_len(msg: Message, name: str, value: bytes, *lengths: int) -> None:
    if len(value) not in lengths:
        want = " or ".join(map(str, lengths))
        raise _fail(msg, f"{name} must be {want} bytes, got {len(value)}")


def _check_runs(msg: Message, runs: object, name: str) -> tuple[int, int, int]:
    """Validate ``(first_page, count)`` pairs; returns (pages, runs, end page)."""
    if type(runs) is not tuple:
        raise _fail(msg, f"{name} must be a tuple, got {type(runs).__name__}")
    if not 1 <= len(runs) <= MAX_BATCH_RUNS:
        raise _fail(msg, f"{name} has {len(runs)} entries, must be 1..{MAX_BATCH_RUNS}")
    # Per-run checks run in C (map/zip/min/sum), not in a Python loop.
    if not all(map(isinstance, runs, repeat(tuple))):
        raise _fail(msg, "each run must be a (first_page, count) tuple")
    try:
        firsts, counts = zip(*runs, strict=True)
    except ValueError:
        raise _fail(msg, "each run must be a (first_page, count) pair") from None
    if set(map(type, firsts)) != {int} or set(map(type, counts)) != {int}:
        raise _fail(msg, "run first_page and count must be int")
    if min(firsts) < 0 or min(counts) < 1:
        raise _fail(msg, f"{name} need first_page >= 0 and count >= 1")
    end = max(map(add, firsts, counts))
    if end > U64_MAX:
        raise _fail(msg, "run beyond page 2**64-1")
    return sum(counts), len(runs), end


class Message:
    """Base of all messages.  Subclasses are registered in ``REGISTRY``."""

    __slots__ = ()

    TYPE: ClassVar[MsgType]
    #: ((field name, kind), ...) in declaration order; set by ``_register``.
    _FIELDS: ClassVar[tuple[tuple[str, int], ...]]
    _NAMES: ClassVar[frozenset[str]]

    def __post_init__(self) -> None:
        for name, kind in self._FIELDS:
            value = getattr(self, name)
            if kind == _INT:
                _check_int(self, name, value)
            elif kind == _STR:
                _check_str(self, name, value)
            elif kind == _BYTES:
                if type(value) is not bytes:
                    raise _fail(self, f"{name} must be bytes, got {type(value).__name__}")
                if len(value) > MAX_BLOB_BYTES:
                    raise _fail(self, f"{name} is {len(value)} bytes, limit {MAX_BLOB_BYTES}")
            elif kind == _STRS:
                if type(value) is not tuple:
                    raise _fail(self, f"{name} must be a tuple, got {type(value).__name__}")
                if len(value) > MAX_FEATURES:
                    raise _fail(self, f"{name} has {len(value)} entries, limit {MAX_FEATURES}")
                for item in value:
                    _check_str(self, name, item)
            elif kind == _CODE:
                if type(value) is not ErrorCode:
                    if type(value) is not int or value not in _ERROR_CODES:
                        raise _fail(self, f"{name}={value!r} is not an ErrorCode")
                    object.__setattr__(self, name, ErrorCode(value))
            elif kind == _FLAGS:
                if type(value) is not BatchFlags:
                    if type(value) is not int:
                        raise _fail(self, f"{name} must be BatchFlags, got {type(value).__name__}")
                    if value < 0 or value & ~_KNOWN_FLAGS:
                        raise _fail(self, f"{name}={value:#x} has unknown bits")
                    object.__setattr__(self, name, BatchFlags(value))
            # _RUNS is checked by PageBatch._check
        self._check()

    def _check(self) -> None:
        """Per-class cross-field checks; raise ``LocalProtocolError``."""

    def to_body(self) -> dict[str, Any]:
        """The msgpack map for this message (see the module docstring)."""
        body: dict[str, Any] = {}
        for name, kind in self._FIELDS:
            value = getattr(self, name)
            if kind == _RUNS:
                value = list(chain.from_iterable(value))
            elif kind == _CODE or kind == _FLAGS:
                value = int(value)
            body[name] = value
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Self:
        """Build from a decoded msgpack map; strict.

        Raises ``RemoteProtocolError(MALFORMED)`` for a non-dict body, unknown
        or missing keys, wrong types and invalid values.
        """
        name = cls.__name__
        if type(body) is not dict:
            raise RemoteProtocolError(f"{name} body must be a map, got {type(body).__name__}")
        if body.keys() != cls._NAMES:
            unknown = sorted(repr(key)[:64] for key in body.keys() - cls._NAMES)
            missing = sorted(cls._NAMES - body.keys())
            parts = []
            if unknown:
                parts.append(f"unknown keys {', '.join(unknown)}")
            if missing:
                parts.append(f"missing keys {', '.join(missing)}")
            raise RemoteProtocolError(f"invalid {name}: {'; '.join(parts)}")
        kwargs: dict[str, Any] = {}
        for key, kind in cls._FIELDS:
            value = body[key]
            if kind == _STRS:
                if type(value) is list:
                    value = tuple(value)
            elif kind == _RUNS:
                if type(value) is not list or len(value) % 2:
                    raise RemoteProtocolError(
                        f"invalid {name}: {key} must be a flat int array of even length"
                    )
                pairs = iter(value)
                value = tuple(zip(pairs, pairs))
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(exc.reason, ErrorCode.MALFORMED) from None


#: MsgType -> message class.  Exhaustive (checked at import time below).
REGISTRY: dict[MsgType, type[Message]] = {}


_M = TypeVar("_M", bound=type[Message])


def _register(cls: _M) -> _M:
    """Derive the field table of a message dataclass and add it to REGISTRY."""
    table = []
    for f in fields(cls):
        if not f.init:
            continue  # private caches such as PageBatch._pages
        annotation = f.type if isinstance(f.type, str) else f.type.__name__
        table.append((f.name, _KIND_OF_ANNOTATION[annotation]))
    cls._FIELDS = tuple(table)
    cls._NAMES = frozenset(name for name, _ in table)
    if cls.TYPE in REGISTRY:
        raise RuntimeError(f"duplicate message class for {cls.TYPE!r}")
    REGISTRY[cls.TYPE] = cls
    return cls


# -- handshake ---------------------------------------------------------------


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Message):
    """SOURCE -> DESTINATION, first message.  ``nonce`` is the client nonce."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    version_min: int
    version_max: int
    agent: str
    features: tuple[str, ...]
    max_live_migrations: int
    nonce: bytes

    def _check(self) -> None:
        if self.version_min > self.version_max:
            raise _fail(self, f"version_min {self.version_min} > version_max {self.version_max}")
        if self.max_live_migrations < 1:
            raise _fail(self, "max_live_migrations must be >= 1")
        _check_len(self, "nonce", self.nonce, NONCE_BYTES)


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(Message):
    """DESTINATION -> SOURCE, accepts a Hello.

    ``nonce`` is the server nonce; ``proof`` is the server's HMAC proof
    (``auth_proof(key, "server", client_nonce, server_nonce)``), or empty when
    the destination has no key.

    ``slots_free``, ``memory_free_bytes`` and ``status`` ("accepting" or
    "maintenance") describe the destination's load right now, so a source
    spreading a drain over several targets can pick one without a second
    round trip (a probe is Hello/Welcome and a close).
    """

    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    version: int
    agent: str
    features: tuple[str, ...]
    max_live_migrations: int
    slots: int
    nonce: bytes
    proof: bytes
    slots_free: int
    memory_free_bytes: int
    status: str

    def _check(self) -> None:
        if self.slots < 1:
            raise _fail(self, "slots must be >= 1")
        if self.status not in WELCOME_STATUSES:
            raise _fail(self, f"status must be one of {sorted(WELCOME_STATUSES)}, got {self.status!r}")
        _check_len(self, "nonce", self.nonce, NONCE_BYTES)
        _check_len(self, "proof", self.proof, 0, PROOF_BYTES)


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Auth(Message):
    """SOURCE -> DESTINATION: ``auth_proof(key, "client", cn, sn)``."""

    TYPE: ClassVar[MsgType] = MsgType.AUTH
    proof: bytes

    def _check(self) -> None:
        _check_len(self, "proof", self.proof, PROOF_BYTES)


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Reject(Message):
    """DESTINATION -> SOURCE: refuses a Hello, an Auth, a Prepare or a Query."""

    TYPE: ClassVar[MsgType] = MsgType.REJECT
    code: ErrorCode
    reason: str


# -- migration ---------------------------------------------------------------


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Prepare(Message):
    """SOURCE -> DESTINATION: build a shell for ``vm`` of ``memory_bytes``."""

    TYPE: ClassVar[MsgType] = MsgType.PREPARE
    migration_id: str
    vm: str
    memory_bytes: int
    workload: str
    features: tuple[str, ...]
    source: str
    #: section names, in id order (``PageBatch.section`` etc. index this)
    sections: tuple[str, ...]
    #: msgpack array, one setup map per section (each section validates its own)
    setup: bytes
    #: "incremental" or "full" (see VERIFY_MODES)
    verify_mode: str
    #: data streams the source can use (1..MAX_STREAMS); Ready grants at most this
    streams: int

    def _check(self) -> None:
        _check_id(self, "migration_id", self.migration_id)
        _check_id(self, "vm", self.vm)
        if self.memory_bytes <= 0 or self.memory_bytes % PAGE_SIZE:
            raise _fail(
                self, f"memory_bytes={self.memory_bytes} must be a positive multiple of {PAGE_SIZE}"
            )
        if not 1 <= len(self.sections) <= MAX_SECTIONS or len(set(self.sections)) != len(self.sections):
            raise _fail(self, f"sections must be 1..{MAX_SECTIONS} distinct names")
        if self.verify_mode not in VERIFY_MODES:
            raise _fail(self, f"verify_mode={self.verify_mode!r} is not one of {sorted(VERIFY_MODES)}")
        if not 1 <= self.streams <= MAX_STREAMS:
            raise _fail(self, f"streams={self.streams} must be 1..{MAX_STREAMS}")


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Ready(Message):
    """DESTINATION -> SOURCE: the shell is ready, send pages.

    The pages travel on ``streams`` data connections the source opens to the
    same endpoint, each starting with DATA_STREAM_MAGIC (then TLS) and a
    Join carrying ``token``: a secret only this authenticated connection saw.
    """

    TYPE: ClassVar[MsgType] = MsgType.READY
    migration_id: str
    prefault_ms: int
    #: data streams granted (1..Prepare.streams)
    streams: int
    #: the Join token of this migration's data streams (NONCE_BYTES random bytes)
    token: bytes

    def _check(self) -> None:
        _check_id(self, "migration_id", self.migration_id)
        if not 1 <= self.streams <= MAX_STREAMS:
            raise _fail(self, f"streams={self.streams} must be 1..{MAX_STREAMS}")
        _check_len(self, "token", self.token, NONCE_BYTES)


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Join(Message):
    """SOURCE -> DESTINATION, first frame of a data stream: it carries pages
    of migration ``migration_id`` as stream ``stream`` (0-based) of Ready.streams."""

    TYPE: ClassVar[MsgType] = MsgType.JOIN
    migration_id: str
    stream: int
    token: bytes

    def _check(self) -> None:
        _check_id(self, "migration_id", self.migration_id)
        if not 0 <= self.stream < MAX_STREAMS:
            raise _fail(self, f"stream={self.stream} must be 0..{MAX_STREAMS - 1}")
        _check_len(self, "token", self.token, NONCE_BYTES)


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class PageBatch(Message):
    """SOURCE -> DESTINATION: a batch header; ``payload_len`` raw bytes follow.

    ``runs`` are ``(first_page, count)`` pairs, payload pages in run order.
    """

    TYPE: ClassVar[MsgType] = MsgType.PAGE_BATCH
    section: int
    round: int
    runs: tuple[tuple[int, int], ...]
    flags: BatchFlags
    payload_len: int
    _pages: int = field(init=False, repr=False, compare=False, default=0)

    @property
    def pages(self) -> int:
        """Total pages in ``runs``."""
        return self._pages

    def _check(self) -> None:
        _check_section(self, self.section)
        pages, _, _ = _check_runs(self, self.runs, "runs")
        if pages > MAX_BATCH_PAGES:
            raise _fail(self, f"{pages} pages, limit {MAX_BATCH_PAGES}")
        object.__setattr__(self, "_pages", pages)
        expected = 0 if self.flags & BatchFlags.ZERO else pages * PAGE_SIZE
        if self.payload_len != expected:
            raise _fail(
                self,
                f"payload_len={self.payload_len}, expected {expected} "
                f"for {pages} pages with flags={self.flags!r}",
            )


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundEnd(Message):
    """SOURCE -> DESTINATION: closes one pre-copy round."""

    TYPE: ClassVar[MsgType] = MsgType.ROUND_END
    round: int
    pages_sent: int
    dirty_pages: int


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class StateTransfer(Message):
    """SOURCE -> DESTINATION: final device/vCPU state; guest is paused."""

    TYPE: ClassVar[MsgType] = MsgType.STATE_TRANSFER
    vcpu_state: bytes
    device_state: bytes

    def _check(self) -> None:
        total = len(self.vcpu_state) + len(self.device_state)
        if total > MAX_BLOB_BYTES:
            raise _fail(self, f"state is {total} bytes, limit {MAX_BLOB_BYTES}")


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Digests(Message):
    """DESTINATION -> SOURCE, after StateTransfer and before Resume: one
    16-byte xxh3-128 digest per ``chunk_pages`` (4 KiB units) of one section,
    as the destination holds it while its guest is still paused."""

    TYPE: ClassVar[MsgType] = MsgType.DIGESTS
    section: int
    chunk_pages: int
    digests: bytes

    @property
    def count(self) -> int:
        """Number of digests."""
        return len(self.digests) // DIGEST_BYTES

    def _check(self) -> None:
        _check_section(self, self.section)
        if self.chunk_pages < 1:
            raise _fail(self, "chunk_pages must be >= 1")
        if len(self.digests) % DIGEST_BYTES:
            raise _fail(self, f"digests length {len(self.digests)} is not a multiple of {DIGEST_BYTES}")


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Resume(Message):
    """SOURCE -> DESTINATION: every section's digests matched the frozen
    source: start the guest (the only way a destination guest ever runs)."""

    TYPE: ClassVar[MsgType] = MsgType.RESUME
    migration_id: str

    def _check(self) -> None:
        _check_id(self, "migration_id", self.migration_id)


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Resumed(Message):
    """DESTINATION -> SOURCE: the guest runs here."""

    TYPE: ClassVar[MsgType] = MsgType.RESUMED
    writes: int


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Commit(Message):
    """SOURCE -> DESTINATION: the source has dropped its copy."""

    TYPE: ClassVar[MsgType] = MsgType.COMMIT
    migration_id: str

    def _check(self) -> None:
        _check_id(self, "migration_id", self.migration_id)


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Committed(Message):
    """DESTINATION -> SOURCE: acknowledges Commit; the migration is done."""

    TYPE: ClassVar[MsgType] = MsgType.COMMITTED


# -- queries and aborts ------------------------------------------------------


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Query(Message):
    """SOURCE -> DESTINATION: what became of ``migration_id``?"""

    TYPE: ClassVar[MsgType] = MsgType.QUERY
    migration_id: str

    def _check(self) -> None:
        _check_id(self, "migration_id", self.migration_id)


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class QueryResult(Message):
    """DESTINATION -> SOURCE: answer to a Query."""

    TYPE: ClassVar[MsgType] = MsgType.QUERY_RESULT
    migration_id: str
    state: str

    def _check(self) -> None:
        _check_id(self, "migration_id", self.migration_id)
        if self.state not in QUERY_STATES:
            raise _fail(self, f"state={self.state!r} is not one of {sorted(QUERY_STATES)}")


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class Abort(Message):
    """Either side, any state after Welcome: give up with ``code``."""

    TYPE: ClassVar[MsgType] = MsgType.ABORT
    code: ErrorCode
    reason: str


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundAck(Message):
    """DESTINATION -> SOURCE during the transfer: every page of ``round``
    (up to its RoundEnd) is in guest memory. The source waits for it before
    pausing the guest, so the destination's backlog is not downtime (cf.
    multifd's end-of-round sync)."""

    TYPE: ClassVar[MsgType] = MsgType.ROUND_ACK
    round: int


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class SectionState(Message):
    """SOURCE -> DESTINATION during the transfer or at the pause: a small
    blob of one section's state (e.g. device registers), applied by the
    destination's half of that section."""

    TYPE: ClassVar[MsgType] = MsgType.SECTION_STATE
    section: int
    data: bytes

    def _check(self) -> None:
        _check_section(self, self.section)


_missing = set(MsgType) - REGISTRY.keys()
if _missing:  # pragma: no cover - caught at import time
    raise RuntimeError(f"no message class for {sorted(_missing)}")
del _missing
