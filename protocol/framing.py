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

Two ways to use this module:

* The data plane reads ``PREFIX_SIZE`` bytes, calls ``parse_prefix``, reads
  ``body_len`` bytes, calls ``decode_body``, then ``recv_into``s the payload
  straight into guest memory.
* ``FrameDecoder`` does the same over arbitrary chunks (h11 style)::

      decoder.receive_data(chunk)          # b"" means EOF
      while (event := decoder.next_event()) is not NEED_DATA:
          ...                              # Message, Payload or CLOSED
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
    """Incremental frame decoder (h11 ``receive_data``/``next_event`` style).

    Events: a ``Message``; then, after a ``PageBatch`` with a payload, one or
    more ``Payload`` chunks totalling ``payload_len`` bytes; ``NEED_DATA``;
    ``CLOSED`` (EOF at a frame boundary).  EOF anywhere else raises
    ``RemoteProtocolError(TRUNCATED)``.

    Memory bound: the prefix is checked as soon as its 16 bytes are here
    (magic even sooner), so an incomplete frame never occupies more than
    ``MAX_INCOMPLETE_FRAME_BYTES``.  Payload bytes are handed out as they
    arrive, never accumulated.

    After an error, every call raises a ``RemoteProtocolError`` again.
    """

    __slots__ = ("_buf", "_eof", "_prefix", "_payload_left", "_error")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._prefix: FramePrefix | None = None
        self._payload_left = 0
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as events."""
        return len(self._buf)

    @property
    def payload_remaining(self) -> int:
        """Payload bytes of the current ``PageBatch`` still to come."""
        return self._payload_left

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError(
                f"decoder unusable after earlier error: {self._error.reason}", self._error.code
            )

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; ``b""`` means EOF."""
        self._raise_if_failed()
        if self._eof:
            if data:
                raise LocalProtocolError("received data after EOF")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Message | Payload | type[NEED_DATA] | type[CLOSED]:  # type: ignore[valid-type]
        """Return the next event, ``NEED_DATA`` or ``CLOSED``."""
        self._raise_if_failed()
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            raise

    def _next_event(self) -> Message | Payload | type[NEED_DATA] | type[CLOSED]:  # type: ignore[valid-type]
        buf = self._buf
        if self._payload_left:
            if buf:
                n = min(len(buf), self._payload_left)
                chunk = bytes(buf[:n])
                del buf[:n]
                self._payload_left -= n
                return Payload(chunk)
            if self._eof:
                raise RemoteProtocolError(
                    f"EOF with {self._payload_left} payload bytes missing", ErrorCode.TRUNCATED
                )
            return NEED_DATA

        prefix = self._prefix
        if prefix is None:
            if len(buf) < PREFIX_SIZE:
                head = bytes(buf[:4])
                if head != MAGIC[: len(head)]:  # fail fast on e.g. "GET /"
                    parse_prefix(head)
                if not self._eof:
                    return NEED_DATA
                if not buf:
                    return CLOSED
                raise RemoteProtocolError(
                    f"EOF inside a frame prefix ({len(buf)} of {PREFIX_SIZE} bytes)",
                    ErrorCode.TRUNCATED,
                )
            prefix = self._prefix = parse_prefix(buf)

        end = PREFIX_SIZE + prefix.body_len
        if len(buf) < end:
            if self._eof:
                raise RemoteProtocolError(
                    f"EOF inside a {prefix.type.name} body "
                    f"({len(buf) - PREFIX_SIZE} of {prefix.body_len} bytes)",
                    ErrorCode.TRUNCATED,
                )
            return NEED_DATA
        with memoryview(buf) as view:
            msg = decode_body(prefix, view[PREFIX_SIZE:end])
        del buf[:end]
        self._prefix = None
        self._payload_left = prefix.payload_len
        return msg
