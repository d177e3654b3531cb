"""Wire constants of the livemig migration protocol.

Every limit has a name and lives here (STYLE 2.9 rule 4): the decoder checks
them *before* it buffers or allocates anything.  Codes, types and flags are
``IntEnum``/``IntFlag`` so they travel as small ints and read as names.

This module is pure data: no imports beyond :mod:`enum`.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "PROTOCOL_VERSION",
    "MIN_PROTOCOL_VERSION",
    "MAGIC",
    "PAGE_SIZE",
    "MAX_FRAME_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_BATCH_RUNS",
    "MAX_BATCH_PAGES",
    "MAX_STRING",
    "MAX_FEATURES",
    "MAX_ID_CHARS",
    "NONCE_BYTES",
    "MAX_STREAMS",
    "DATA_STREAM_MAGIC",
    "PROOF_BYTES",
    "DIGEST_BYTES",
    "U64_MAX",
    "MsgType",
    "ErrorCode",
    "BatchFlags",
]

#: Highest protocol version this implementation speaks.
PROTOCOL_VERSION: Final = 3
#: Lowest protocol version this implementation still speaks.
MIN_PROTOCOL_VERSION: Final = 3

#: First four bytes of every frame.  Anything else (an HTTP request, TLS
#: ClientHello, port scanner garbage) fails with ``ErrorCode.BAD_MAGIC``.
MAGIC: Final = b"LMIG"

#: Guest page size in bytes.  Must equal ``memstore.layout.PAGE_SIZE``
#: (cross-checked by a test outside this package; protocol does not import
#: memstore).
PAGE_SIZE: Final = 4096

#: Largest msgpack body of one frame (``body_len`` in the prefix).
MAX_FRAME_BYTES: Final = 4 * 1024 * 1024
#: Largest raw payload following one frame (``payload_len`` in the prefix).
MAX_PAYLOAD_BYTES: Final = 64 * 1024 * 1024
#: Most ``(first_page, count)`` runs in one ``PageBatch``.
MAX_BATCH_RUNS: Final = 4096
#: Most pages in one ``PageBatch`` (16384 * 4 KiB = 64 MiB = MAX_PAYLOAD_BYTES).
MAX_BATCH_PAGES: Final = 16384
#: Longest str field, in UTF-8 *bytes* (this is what msgpack limits).
MAX_STRING: Final = 4096
#: Most feature names in a Hello/Welcome/Prepare.
MAX_FEATURES: Final = 64
#: Longest ``migration_id`` / ``vm`` name, in characters.
MAX_ID_CHARS: Final = 64
#: Handshake nonce length.
NONCE_BYTES: Final = 16
#: Most data streams of one migration (``Prepare.streams``).
MAX_STREAMS: Final = 8
#: First bytes of a data-stream connection, before TLS: the endpoint reads
#: them to tell a data stream (served by a thread) from a control connection.
DATA_STREAM_MAGIC: Final = b"LMDATA3\n"
#: HMAC-SHA256 proof length.
PROOF_BYTES: Final = 32
#: One xxh3-128 digest.
DIGEST_BYTES: Final = 16
#: Largest int msgpack can carry unsigned; every int field is 0..U64_MAX.
U64_MAX: Final = 2**64 - 1

assert MAX_BATCH_PAGES * PAGE_SIZE <= MAX_PAYLOAD_BYTES


class MsgType(enum.IntEnum):
    """Frame type (u16 in the prefix).  One message class per member."""

    HELLO = 1
    WELCOME = 2
    AUTH = 3
    REJECT = 4
    PREPARE = 5
    READY = 6
    PAGE_BATCH = 7
    ROUND_END = 8
    STATE_TRANSFER = 9
    DIGESTS = 10
    RESUME = 11
    RESUMED = 12
    COMMIT = 13
    COMMITTED = 14
    QUERY = 15
    QUERY_RESULT = 16
    ABORT = 17
    ROUND_ACK = 18
    SECTION_STATE = 19
    JOIN = 20


class ErrorCode(enum.IntEnum):
    """Why something failed; carried by ``Reject``/``Abort`` and by errors."""

    MALFORMED = 1
    UNKNOWN_TYPE = 2
    TOO_LARGE = 3
    TRUNCATED = 4
    BAD_MAGIC = 5
    #: message not allowed in this state
    UNEXPECTED = 6
    VERSION_MISMATCH = 7
    AUTH_FAILED = 8
    NO_MEMORY = 9
    BUSY = 10
    VM_EXISTS = 11
    MAINTENANCE = 12
    VERIFY_FAILED = 13
    CANCELLED = 14
    INTERNAL = 15
    TIMEOUT = 16
    INCOMPATIBLE = 17


class BatchFlags(enum.IntFlag):
    """Flags of a ``PageBatch``."""

    NONE = 0
    #: the runs are zero pages: announced, not sent (no payload)
    ZERO = 1
