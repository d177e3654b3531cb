"""Frame codec: sans-IO, bytes in -> events out, messages in -> bytes out.

Frame layout (all integers big-endian)::

    offset  size  field
    0       4     magic        b"LMIG"
    4       2     type         MsgType (u16)
    6       2     flags        reserved, must be 0
    8       4     body_len     msgpack body bytes   (<= MAX_FRAME_BYTES)
    12      4     payload_len  raw payload bytes    (<= MAX_PAYLOAD_BYTES, PAGE_BATCH only)
    16      body_len     msgpack map (the message fields)
    ..      payload_len  raw bytes (page contents), never through msgpack

Worked example: ``PageBatch(round=0, runs=((7, 1),), flags=NONE,
payload_len=4096)``::

    4c4d4947 0007 0000 00000026 00001000 | 84 a5 "round" 00 a4 "runs" 92 07 01 ... | 4096 bytes of page 7
    magic    type flags body_len payload  | body (msgpack map, 38 bytes)          | payload

The prefix is checked (magic, type, flags, sizes) *before* any body byte is
buffered, so a hostile length cannot make us allocate (h2 ``frame_buffer``).

``FrameDecoder`` is the one frame parser (the agent's transport drives it
too). Bytes reach it in one of two ways, and it hands payloads out in one of
two ways:

* chunks (h11 style): ``receive_data(chunk)`` (``b""`` = EOF), then
  ``next_event()`` until ``NEED_DATA``;
* exact reads (the zero-copy data plane): ``get_buffer()`` is a writable view
  of exactly the bytes still missing from the current prefix or body, the IO
  layer ``recv_into``s it and calls ``buffer_updated(n)``. Nothing is ever read
  past a frame boundary.

Payload of a ``PageBatch``: by default ``Payload`` events (copies, for
tests and tools). With ``payload_passthrough=True`` the decoder instead
returns ``PayloadFollows(nbytes)`` after the batch: the next ``nbytes`` of
the stream are the caller's, to read into its own buffers (guest memory)
and report with ``payload_received(n)``; bytes that already reached the
decoder as chunks are taken with ``readinto_payload(dest)``::

    next_event:  Hello ... PageBatch  PayloadFollows(n)  RoundEnd ... CLOSED
    bytes:       [prefix][body] ...   [prefix][body]  <- n payload bytes ->  [prefix][body]
    who reads:   decoder's buffers                     caller's buffers     decoder's buffers
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import msgpack

from .errors import LocalProtocolError, RemoteProtocolError
from .messages import REGISTRY, Message, PageBatch
from .wire import (
    MAGIC,
    MAX_BATCH_RUNS,
    MAX_FEATURES,
    MAX_FRAME_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_STRING,
    ErrorCode,
    MsgType,
)

__all__ = [
    "PREFIX",
    "PREFIX_SIZE",
    "MAX_INCOMPLETE_FRAME_BYTES",
    "FramePrefix",
    "Payload",
    "PayloadFollows",
    "NEED_DATA",
    "CLOSED",
    "parse_prefix",
    "decode_body",
    "encode_frame",
    "FrameDecoder",
]

PREFIX: Final = struct.Struct("!4sHHII")
PREFIX_SIZE: Final = 16
assert PREFIX.size == PREFIX_SIZE
#: The most bytes of one incomplete frame a ``FrameDecoder`` ever holds.
MAX_INCOMPLETE_FRAME_BYTES: Final = PREFIX_SIZE + MAX_FRAME_BYTES

_TYPES: Final = {int(t): t for t in MsgType}
_MAX_MAP_LEN: Final = 32
_MAX_ARRAY_LEN: Final = 2 * MAX_BATCH_RUNS + MAX_FEATURES


class _SentinelBase(type):
    def __repr__(cls) -> str:
        return cls.__name__


def _make_sentinel(name: str) -> type:
    # h11's trick: a class that is an instance of itself, so it is a unique
    # object with a readable repr, usable with ``is`` and in annotations.
    cls = _SentinelBase(name, (_SentinelBase,), {})
    cls.__class__ = cls
    return cls


#: ``FrameDecoder.next_event`` needs more bytes.
NEED_DATA: Final = _make_sentinel("NEED_DATA")
#: The peer closed the stream cleanly at a frame boundary.
CLOSED: Final = _make_sentinel("CLOSED")


@dataclass(frozen=True, slots=True)
class FramePrefix:
    """A checked frame prefix."""

    type: MsgType
    body_len: int
    payload_len: int


@dataclass(frozen=True, slots=True)
class Payload:
    """A chunk of the raw payload of the preceding ``PageBatch``."""

    data: bytes

    def __repr__(self) -> str:  # never dump page contents into a traceback
        return f"Payload(<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True)
class PayloadFollows:
    """The next ``nbytes`` bytes of the stream are the payload of the
    ``PageBatch`` just returned (pass-through mode only).

    The caller takes them: ``payload_received(n)`` for bytes it read from the
    stream into its own buffers, ``readinto_payload(dest)`` for bytes that
    already reached the decoder through ``receive_data``.  Until all are
    taken, ``next_event`` keeps returning ``PayloadFollows`` with what is left.
    """

    nbytes: int


def parse_prefix(data: bytes | bytearray | memoryview) -> FramePrefix:
    """Check and parse the first ``PREFIX_SIZE`` bytes of ``data``.

    Raises ``RemoteProtocolError`` with ``BAD_MAGIC``, ``UNKNOWN_TYPE``,
    ``MALFORMED`` (flags, payload on a non-PAGE_BATCH), ``TOO_LARGE`` or
    ``TRUNCATED`` (fewer than ``PREFIX_SIZE`` bytes).
    """
    if len(data) < PREFIX_SIZE:
        if bytes(data[:4]) != MAGIC[: len(data[:4])]:
            raise RemoteProtocolError("bad magic: not a livemig stream", ErrorCode.BAD_MAGIC)
        raise RemoteProtocolError(
            f"frame prefix truncated: {len(data)} of {PREFIX_SIZE} bytes", ErrorCode.TRUNCATED
        )
    magic, type_, flags, body_len, payload_len = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise RemoteProtocolError(
            f"bad magic {magic!r}: not a livemig stream", ErrorCode.BAD_MAGIC
        )
    msg_type = _TYPES.get(type_)
    if msg_type is None:
        raise RemoteProtocolError(f"unknown message type {type_}", ErrorCode.UNKNOWN_TYPE)
    if flags:
        raise RemoteProtocolError(f"reserved frame flags set: {flags:#06x}")
    if body_len > MAX_FRAME_BYTES:
        raise RemoteProtocolError(
            f"{msg_type.name} body of {body_len} bytes exceeds {MAX_FRAME_BYTES}",
            ErrorCode.TOO_LARGE,
        )
    if payload_len > MAX_PAYLOAD_BYTES:
        raise RemoteProtocolError(
            f"{msg_type.name} payload of {payload_len} bytes exceeds {MAX_PAYLOAD_BYTES}",
            ErrorCode.TOO_LARGE,
        )
    if payload_len and msg_type is not MsgType.PAGE_BATCH:
        raise RemoteProtocolError(f"{msg_type.name} frame may not carry a payload")
    return FramePrefix(msg_type, body_len, payload_len)


def _pairs_to_dict(pairs: list[tuple[object, object]]) -> dict[object, object]:
    body = dict(pairs)
    if len(body) != len(pairs):
        raise ValueError("duplicate key in map")
    return body


def decode_body(prefix: FramePrefix, body: bytes | bytearray | memoryview) -> Message:
    """Decode and validate the msgpack body that followed ``prefix``.

    Raises ``RemoteProtocolError``: ``TRUNCATED`` if ``body`` is shorter than
    ``prefix.body_len``, otherwise ``MALFORMED`` for anything wrong (bad or
    trailing msgpack, non-map body, duplicate/unknown/missing keys, wrong types,
    invalid values, PageBatch payload_len not matching the prefix).
    """
    name = prefix.type.name
    if len(body) != prefix.body_len:
        if len(body) < prefix.body_len:
            raise RemoteProtocolError(
                f"{name} body truncated: {len(body)} of {prefix.body_len} bytes",
                ErrorCode.TRUNCATED,
            )
        raise RemoteProtocolError(
            f"{name} body is {len(body)} bytes, prefix says {prefix.body_len}"
        )
    try:
        fields = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_pairs_to_dict,
            max_bin_len=MAX_FRAME_BYTES,
            max_str_len=MAX_STRING,
            max_array_len=_MAX_ARRAY_LEN,
            max_map_len=_MAX_MAP_LEN,
            max_ext_len=0,
        )
    except (ValueError, TypeError, OverflowError, RuntimeError, msgpack.UnpackException) as exc:
        # ExtraData (trailing bytes), FormatError, StackError, OutOfData,
        # limit violations, bad UTF-8, non-str map keys, duplicate keys.
        raise RemoteProtocolError(f"{name} body is not a valid msgpack map: {exc}") from None
    if type(fields) is not dict:
        raise RemoteProtocolError(f"{name} body must be a map, got {type(fields).__name__}")
    msg = REGISTRY[prefix.type].from_body(fields)
    if type(msg) is PageBatch:
        if msg.payload_len != prefix.payload_len:
            raise RemoteProtocolError(
                f"PAGE_BATCH payload_len={msg.payload_len} but prefix says {prefix.payload_len}"
            )
    return msg


def encode_frame(msg: Message) -> bytes:
    """Prefix + msgpack body of ``msg``.

    The payload is *not* included: after a ``PageBatch`` frame the caller
    sends exactly ``msg.payload_len`` raw bytes.
    """
    if not isinstance(msg, Message):
        raise LocalProtocolError(f"not a protocol message: {type(msg).__name__}")
    body = msgpack.packb(msg.to_body(), use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise LocalProtocolError(
            f"{msg.TYPE.name} body of {len(body)} bytes exceeds {MAX_FRAME_BYTES}",
            ErrorCode.TOO_LARGE,
        )
    payload_len = msg.payload_len if type(msg) is PageBatch else 0
    return PREFIX.pack(MAGIC, msg.TYPE, 0, len(body), payload_len) + body


class FrameDecoder:
    """Incremental frame decoder: the one frame parser of livemig.

    Events from ``next_event()``: a ``Message``; after a ``PageBatch`` with a
    payload, either ``Payload`` chunks totalling ``payload_len`` bytes or,
    with ``payload_passthrough=True``, ``PayloadFollows``; ``NEED_DATA``;
    ``CLOSED`` (EOF at a frame boundary).  EOF anywhere else raises
    ``RemoteProtocolError(TRUNCATED)``.

    Input: chunks through ``receive_data`` (any sizes, ``b""`` = EOF), or
    exact reads through ``get_buffer``/``buffer_updated`` (an
    ``asyncio.BufferedProtocol`` maps onto them one to one).  One state
    machine serves both: prefix (``PREFIX_SIZE`` bytes) -> body
    (``body_len``) -> payload (``payload_len``) -> prefix ...

    Memory bound: the magic is checked on its first byte, the whole prefix
    (type, flags, sizes) as soon as its 16 bytes are here and before the body
    buffer exists, so an incomplete frame never occupies more than
    ``MAX_INCOMPLETE_FRAME_BYTES``.  Payload bytes are never accumulated: they
    are handed out as they arrive, or (pass-through) never touch the decoder.

    After an error, every call raises a ``RemoteProtocolError`` again.
    """

    __slots__ = (
        "_passthrough",
        "_pending",
        "_eof",
        "_head",
        "_head_got",
        "_prefix",
        "_body",
        "_body_got",
        "_payload_left",
        "_error",
    )

    def __init__(self, *, payload_passthrough: bool = False) -> None:
        self._passthrough = payload_passthrough
        #: chunks from receive_data not yet moved into a piece or handed out
        self._pending = bytearray()
        self._eof = False
        #: the prefix piece; written in place, never resized (a BufferedProtocol
        #: caller may still hold the view ``get_buffer`` returned)
        self._head = bytearray(PREFIX_SIZE)
        self._head_got = 0
        self._prefix: FramePrefix | None = None
        #: the body piece, allocated once its prefix is checked
        self._body: bytearray | None = None
        self._body_got = 0
        self._payload_left = 0
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as events."""
        return len(self._pending) + self._head_got + self._body_got

    @property
    def payload_remaining(self) -> int:
        """Payload bytes of the current ``PageBatch`` still to come."""
        return self._payload_left

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError(
                f"decoder unusable after earlier error: {self._error.reason}", self._error.code
            )

    # -- input: chunks ---------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the peer; ``b""`` means EOF."""
        self._raise_if_failed()
        if self._eof:
            if data:
                raise LocalProtocolError("received data after EOF")
            return
        if data:
            self._pending += data
        else:
            self._eof = True

    # -- input: exact reads (zero copy) -------------------------------------------

    def get_buffer(self) -> memoryview:
        """Where the next stream bytes go: a writable view of exactly the bytes
        still missing from the current prefix or body (never more, so a read
        into it cannot cross a frame boundary).  Fill a prefix of it, then call
        ``buffer_updated(n)`` and ``next_event()``.

        Payload bytes are not read through here: after ``PayloadFollows`` they
        go into the caller's own buffers (``payload_received``).
        """
        if self._error is not None:
            self._raise_if_failed()
        if self._payload_left:
            raise LocalProtocolError(
                "payload bytes go to the caller's buffers (PayloadFollows, payload_received)"
            )
        if self._pending or self._eof:
            raise LocalProtocolError("get_buffer after receive_data or EOF: use one input style")
        prefix = self._prefix
        if prefix is None:
            if self._head_got < PREFIX_SIZE:
                return memoryview(self._head)[self._head_got :]
        elif self._body_got < prefix.body_len:
            if self._body is None:
                self._body = bytearray(prefix.body_len)
            return memoryview(self._body)[self._body_got :]
        raise LocalProtocolError("a frame piece is complete: call next_event first")

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer`` view."""
        if self._error is not None:
            self._raise_if_failed()
        prefix = self._prefix
        if self._payload_left:
            raise LocalProtocolError("payload bytes are reported with payload_received")
        if prefix is None:
            if not 0 <= nbytes <= PREFIX_SIZE - self._head_got:
                raise LocalProtocolError(f"buffer_updated({nbytes}) beyond the prefix")
            self._head_got += nbytes
        else:
            if not 0 <= nbytes <= prefix.body_len - self._body_got:
                raise LocalProtocolError(f"buffer_updated({nbytes}) beyond the {prefix.type.name} body")
            self._body_got += nbytes

    # -- payload pass-through ------------------------------------------------------

    def payload_received(self, nbytes: int) -> None:
        """The caller read ``nbytes`` payload bytes from the stream into its own
        buffers (pass-through).  Hot path: a few integer checks, no copy."""
        if self._error is not None or not self._passthrough:
            self._raise_if_failed()
            raise LocalProtocolError("payload_received needs payload_passthrough=True")
        if self._pending:
            # The stream's next bytes are already here: reading more from the
            # stream now would put later bytes before them.
            raise LocalProtocolError("payload bytes are buffered here: take them with readinto_payload")
        if not 0 <= nbytes <= self._payload_left:
            raise LocalProtocolError(
                f"payload_received({nbytes}) but {self._payload_left} payload bytes remain"
            )
        self._payload_left -= nbytes

    def readinto_payload(self, dest: bytearray | memoryview) -> int:
        """Copy payload bytes that reached the decoder through ``receive_data``
        into ``dest`` (pass-through); returns how many (0: none are buffered,
        the rest is still in the stream)."""
        self._raise_if_failed()
        if not self._passthrough:
            raise LocalProtocolError("readinto_payload needs payload_passthrough=True")
        pending = self._pending
        n = min(len(dest), self._payload_left, len(pending))
        if n:
            with memoryview(pending) as src:
                dest[:n] = src[:n]
            del pending[:n]
            self._payload_left -= n
        return n

    # -- output --------------------------------------------------------------------

    def next_event(self) -> Message | Payload | PayloadFollows | type[NEED_DATA] | type[CLOSED]:  # type: ignore[valid-type]
        """Return the next event, ``NEED_DATA`` or ``CLOSED``."""
        if self._error is not None:
            self._raise_if_failed()
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            self._pending = bytearray()
            self._body = None
            self._head_got = self._body_got = 0
            raise

    def _take(self, piece: bytearray, got: int, size: int) -> int:
        """Move pending chunk bytes into ``piece[got:size]``; return the new fill."""
        pending = self._pending
        n = min(size - got, len(pending))
        if n:
            with memoryview(pending) as src:
                piece[got : got + n] = src[:n]
            del pending[:n]
        return got + n

    def _next_event(self) -> Message | Payload | PayloadFollows | type[NEED_DATA] | type[CLOSED]:  # type: ignore[valid-type]
        pending = self._pending
        if self._payload_left:
            if pending:
                if self._passthrough:
                    return PayloadFollows(self._payload_left)
                n = min(len(pending), self._payload_left)
                chunk = bytes(pending[:n])
                del pending[:n]
                self._payload_left -= n
                return Payload(chunk)
            if self._eof:
                raise RemoteProtocolError(
                    f"EOF with {self._payload_left} payload bytes missing", ErrorCode.TRUNCATED
                )
            return PayloadFollows(self._payload_left) if self._passthrough else NEED_DATA

        prefix = self._prefix
        if prefix is None:
            got = self._head_got
            if pending and got < PREFIX_SIZE:
                got = self._head_got = self._take(self._head, got, PREFIX_SIZE)
            if got < PREFIX_SIZE:
                if got and self._head[: min(got, 4)] != MAGIC[: min(got, 4)]:
                    parse_prefix(self._head[:got])  # fail fast on e.g. "GET /": BAD_MAGIC
                if not self._eof:
                    return NEED_DATA
                if not got:
                    return CLOSED
                raise RemoteProtocolError(
                    f"EOF inside a frame prefix ({got} of {PREFIX_SIZE} bytes)", ErrorCode.TRUNCATED
                )
            prefix = self._prefix = parse_prefix(self._head)

        size = prefix.body_len
        body = self._body
        if body is None and len(pending) >= size:
            with memoryview(pending) as view:  # the whole body is here: no body buffer
                msg = decode_body(prefix, view[:size])
            del pending[:size]
        else:
            if body is None:
                body = self._body = bytearray(size)
            got = self._body_got
            if pending:
                got = self._body_got = self._take(body, got, size)
            if got < size:
                if self._eof:
                    raise RemoteProtocolError(
                        f"EOF inside a {prefix.type.name} body ({got} of {size} bytes)",
                        ErrorCode.TRUNCATED,
                    )
                return NEED_DATA
            msg = decode_body(prefix, body)
        self._prefix = self._body = None
        self._head_got = self._body_got = 0
        self._payload_left = prefix.payload_len
        return msg
