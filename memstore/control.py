"""The control page: the words the agent and the guest share.

The first 4096 bytes of every segment are a :class:`ControlBlock`. Every
numeric field is a little-endian u64 *slot* read and written through
``memoryview.cast("Q")``: a store is one aligned 8-byte write and a load one
aligned 8-byte read, so the other process never sees half a value.

Worked example (offsets in bytes, a 1 MiB VM = 256 pages, guest paused)::

    slot off   field            writer   example
    ---- ----  ---------------  -------  ------------------------------
       0    0  magic            create   0x3147494d4556494c  b"LIVEMIG1"
       1    8  layout_version   create   1
       2   16  npages           create   256
       3   24  cmd              agent    1 (Cmd.PAUSE)
       4   32  throttle_pct     agent    0  (0..99)
       5   40  guest_state      guest    2 (GuestState.PAUSED)
       6   48  guest_pid        guest    41235
       7   56  writes           guest    120034     \\
       8   64  seed             agent    7           > vCPU state
       9   72  cursor           guest    0          /  (+ workload)
      10   80  rate_pps         guest    20011 (writes/s over ~1 s)
      11   88  heartbeat_ns     guest    time.monotonic_ns() (CLOCK_MONOTONIC)
      12   96  cmd_seq          agent    5
      13  104  ack_seq          guest    5  (== cmd_seq: command 5 obeyed)
      14  112  workload_len     agent    19
      15  120  ndisks           agent    2  (disk maps <segment>.d0, .d1; memstore.disk)
      16  128  disk_cmd         agent    0 (DiskCmd.RUN)
      17  136  disk_cmd_arg     agent    1  (disk index of a REOPEN)
      18  144  disk_cmd_seq     agent    3
      19  152  disk_ack_seq     guest    3  (== disk_cmd_seq: disk command 3 obeyed)
      20  160  disk_result      guest    0  (errno of the last disk command, 0 = done)
      21  168  disk_io_state    guest    1 (DiskIoState.RUNNING)
      22  176  disk_errno       guest    0  (errno of the pwrite that failed the disk IO)
      23  184  io_writes        guest    4021       \\ vCPU state (disk)
      24  192  io_cursor        guest    0          /
      25  200  io_rate_wps      guest    2000 (disk writes/s over ~1 s)
      --  208  reserved, zero, up to 511
          512  workload spec    agent    b"uniform:rate=20000" (UTF-8, <= 512 bytes)
         1024  reserved, zero, up to 4095

Command handshake. The agent alone writes ``cmd``, ``throttle_pct`` and
``cmd_seq``; the guest alone writes ``guest_state``, ``writes``, ``cursor``,
``rate_pps``, ``heartbeat_ns`` and ``ack_seq``. :meth:`ControlBlock.command`
stores ``cmd`` *then* increments ``cmd_seq``; the guest loads ``cmd_seq``
*then* ``cmd`` (:meth:`ControlBlock.read_command`), obeys, stores its state
and finally copies the sequence number it read into ``ack_seq``. Because the
command is stored before its sequence number and loaded after it, the command
the guest obeys is at least as new as the sequence number it acknowledges, so
``ack_seq >= seq`` (:meth:`ControlBlock.acknowledged`) means "command ``seq``,
or a later one, has been carried out and the guest's state for it is in the
control page". Both processes run on the same host; x86-64 keeps stores in
program order (TSO), which is what this relies on.

``workload`` is a variable-length field (length slot + bytes) and is written
only while no guest runs (segment setup, vCPU state load). ``ndisks`` is set
by memstore.disk while no guest runs or while it is paused (a paused guest
re-reads the disk table when it resumes).

Disk IO commands are a second channel with the same handshake
(``disk_cmd_arg`` then ``disk_cmd`` then ``disk_cmd_seq``; the guest stores
``disk_result`` and ``disk_io_state`` before ``disk_ack_seq``), so the agent
can pause the disks alone while RAM writes go on (a storage move):
PAUSE (no disk write is in flight once acknowledged), REOPEN disk i at the
path staged in its map (acknowledged with disk_result 0, or the errno why
the guest kept the old file), RUN. Issue one disk command at a time and wait
for its acknowledgement: the guest only sees the newest. A RAM pause stops
disk writes too (the vCPU is stopped), and a RAM-paused guest still obeys
disk commands. Segments written before these slots existed read zero
there: no disks, RUN, no IO.
"""

from __future__ import annotations

import enum
import time

import msgpack

from .errors import GuestError, SegmentError, WorkloadError
from .layout import PAGE_SIZE, WORKLOAD_SPEC_MAX_BYTES
from .workload import parse_workload, validate_for

__all__ = [
    "MAGIC",
    "LAYOUT_VERSION",
    "CONTROL_SIZE",
    "Cmd",
    "GuestState",
    "DiskCmd",
    "DiskIoState",
    "ControlBlock",
]

MAGIC = int.from_bytes(b"LIVEMIG1", "little")
LAYOUT_VERSION = 1
CONTROL_SIZE = PAGE_SIZE

# Slot indexes (u64 units) of the fields; see the table above.
_MAGIC = 0
_VERSION = 1
_NPAGES = 2
_CMD = 3
_THROTTLE = 4
_GUEST_STATE = 5
_GUEST_PID = 6
_WRITES = 7
_SEED = 8
_CURSOR = 9
_RATE = 10
_HEARTBEAT = 11
_CMD_SEQ = 12
_ACK_SEQ = 13
_WORKLOAD_LEN = 14
_NDISKS = 15
_DISK_CMD = 16
_DISK_CMD_ARG = 17
_DISK_CMD_SEQ = 18
_DISK_ACK_SEQ = 19
_DISK_RESULT = 20
_DISK_IO_STATE = 21
_DISK_ERRNO = 22
_IO_WRITES = 23
_IO_CURSOR = 24
_IO_RATE = 25

_WORKLOAD_OFF = 512
_WORKLOAD_END = _WORKLOAD_OFF + WORKLOAD_SPEC_MAX_BYTES

_U64_MAX = (1 << 64) - 1
_VCPU_KEYS = frozenset({"writes", "seed", "cursor", "workload"})
_VCPU_IO_KEYS = frozenset({"io_writes", "io_cursor"})
MAX_DISKS = 16
_VCPU_BLOB_MAX_BYTES = 1024
THROTTLE_MAX_PCT = 99


class Cmd(enum.IntEnum):
    """What the agent asks the guest to do."""

    RUN = 0
    PAUSE = 1
    STOP = 2


class GuestState(enum.IntEnum):
    """What the guest reports it is doing."""

    NOT_STARTED = 0
    RUNNING = 1
    PAUSED = 2
    STOPPED = 3


class DiskCmd(enum.IntEnum):
    """What the agent asks the guest's disk IO path to do (disk_cmd)."""

    RUN = 0
    PAUSE = 1
    REOPEN = 2      # disk_cmd_arg = disk index; new path staged in its map


class DiskIoState(enum.IntEnum):
    """What the guest reports about its disk IO (disk_io_state)."""

    NOT_STARTED = 0
    RUNNING = 1
    PAUSED = 2
    FAILED = 3      # a pwrite failed (disk_errno); no disk writes until a RUN


def _u64(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MAX:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {value!r}")
    return value


class ControlBlock:
    """Typed access to the 4096-byte control page of a segment.

    ``view`` is a writable byte view of at least CONTROL_SIZE bytes (normally
    the first page of the segment's mmap). Call :meth:`release` before the
    mmap is closed; GuestRam.close() does it for the block it owns.
    """

    __slots__ = ("_raw", "_q")

    def __init__(self, view: memoryview) -> None:
        if len(view) < CONTROL_SIZE or view.readonly:
            raise ValueError(f"control page needs a writable view of {CONTROL_SIZE} bytes")
        self._raw = view[:CONTROL_SIZE]
        self._q = self._raw.cast("Q")

    def release(self) -> None:
        """Drop the views on the page (idempotent)."""
        self._q.release()
        self._raw.release()

    def init_header(self, npages: int) -> None:
        """Write a fresh header (segment creation only): zero everything,
        then npages, version and magic, magic last."""
        self._raw[:] = bytes(CONTROL_SIZE)
        self._q[_NPAGES] = _u64("npages", npages)
        self._q[_VERSION] = LAYOUT_VERSION
        self._q[_MAGIC] = MAGIC

    # ---- header -----------------------------------------------------------
    @property
    def magic(self) -> int:
        return self._q[_MAGIC]

    @magic.setter
    def magic(self, value: int) -> None:
        self._q[_MAGIC] = _u64("magic", value)

    @property
    def layout_version(self) -> int:
        return self._q[_VERSION]

    @layout_version.setter
    def layout_version(self, value: int) -> None:
        self._q[_VERSION] = _u64("layout_version", value)

    @property
    def npages(self) -> int:
        return self._q[_NPAGES]

    @npages.setter
    def npages(self, value: int) -> None:
        self._q[_NPAGES] = _u64("npages", value)

    # ---- agent → guest ----------------------------------------------------
    @property
    def cmd(self) -> Cmd:
        raw = self._q[_CMD]
        try:
            return Cmd(raw)
        except ValueError:
            raise SegmentError(f"control page holds an unknown command {raw}") from None

    @cmd.setter
    def cmd(self, value: Cmd) -> None:
        self._q[_CMD] = Cmd(value)

    @property
    def throttle_pct(self) -> int:
        return self._q[_THROTTLE]

    @throttle_pct.setter
    def throttle_pct(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= THROTTLE_MAX_PCT:
            raise ValueError(f"throttle_pct must be an int in 0..{THROTTLE_MAX_PCT}, got {value!r}")
        self._q[_THROTTLE] = value

    @property
    def cmd_seq(self) -> int:
        return self._q[_CMD_SEQ]

    @cmd_seq.setter
    def cmd_seq(self, value: int) -> None:
        self._q[_CMD_SEQ] = _u64("cmd_seq", value)

    def command(self, cmd: Cmd) -> int:
        """Issue ``cmd``: store it, then bump cmd_seq. Returns the new seq;
        wait for :meth:`acknowledged` (seq) to know the guest obeyed."""
        self._q[_CMD] = Cmd(cmd)
        seq = self._q[_CMD_SEQ] + 1
        self._q[_CMD_SEQ] = seq
        return seq

    def set_throttle(self, pct: int) -> int:
        """Store a new throttle, then bump cmd_seq so the agent can wait for
        the guest to acknowledge that it applies it. Returns the new seq."""
        self.throttle_pct = pct
        seq = self._q[_CMD_SEQ] + 1
        self._q[_CMD_SEQ] = seq
        return seq

    def read_command(self) -> tuple[int, Cmd]:
        """(cmd_seq, cmd), loaded in that order (guest side; see module doc)."""
        seq = self._q[_CMD_SEQ]
        return seq, self.cmd

    # ---- guest → agent ----------------------------------------------------
    @property
    def ack_seq(self) -> int:
        return self._q[_ACK_SEQ]

    @ack_seq.setter
    def ack_seq(self, value: int) -> None:
        self._q[_ACK_SEQ] = _u64("ack_seq", value)

    def acknowledged(self, seq: int) -> bool:
        """True once the guest has obeyed command ``seq`` (or a later one)."""
        return self._q[_ACK_SEQ] >= seq

    def wait_acknowledged(self, seq: int, timeout_s: float, poll_s: float = 0.001) -> bool:
        """Blocking poll of :meth:`acknowledged` every ``poll_s`` for at most
        ``timeout_s``; returns whether it was acknowledged. (For sync callers
        and tests; the agent's event loop polls acknowledged() itself.)"""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._q[_ACK_SEQ] >= seq:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)

    @property
    def guest_state(self) -> GuestState:
        raw = self._q[_GUEST_STATE]
        try:
            return GuestState(raw)
        except ValueError:
            raise SegmentError(f"control page holds an unknown guest state {raw}") from None

    @guest_state.setter
    def guest_state(self, value: GuestState) -> None:
        self._q[_GUEST_STATE] = GuestState(value)

    @property
    def guest_pid(self) -> int:
        return self._q[_GUEST_PID]

    @guest_pid.setter
    def guest_pid(self, value: int) -> None:
        self._q[_GUEST_PID] = _u64("guest_pid", value)

    @property
    def writes(self) -> int:
        return self._q[_WRITES]

    @writes.setter
    def writes(self, value: int) -> None:
        self._q[_WRITES] = _u64("writes", value)

    @property
    def seed(self) -> int:
        return self._q[_SEED]

    @seed.setter
    def seed(self, value: int) -> None:
        self._q[_SEED] = _u64("seed", value)

    @property
    def cursor(self) -> int:
        return self._q[_CURSOR]

    @cursor.setter
    def cursor(self, value: int) -> None:
        self._q[_CURSOR] = _u64("cursor", value)

    @property
    def rate_pps(self) -> int:
        return self._q[_RATE]

    @rate_pps.setter
    def rate_pps(self, value: int) -> None:
        self._q[_RATE] = _u64("rate_pps", value)

    @property
    def heartbeat_ns(self) -> int:
        return self._q[_HEARTBEAT]

    @heartbeat_ns.setter
    def heartbeat_ns(self, value: int) -> None:
        self._q[_HEARTBEAT] = _u64("heartbeat_ns", value)

    # ---- disks --------------------------------------------------------------
    @property
    def ndisks(self) -> int:
        return self._q[_NDISKS]

    @ndisks.setter
    def ndisks(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DISKS:
            raise ValueError(f"ndisks must be an int in 0..{MAX_DISKS}, got {value!r}")
        self._q[_NDISKS] = value

    @property
    def disk_cmd(self) -> DiskCmd:
        raw = self._q[_DISK_CMD]
        try:
            return DiskCmd(raw)
        except ValueError:
            raise SegmentError(f"control page holds an unknown disk command {raw}") from None

    @property
    def disk_cmd_arg(self) -> int:
        return self._q[_DISK_CMD_ARG]

    @property
    def disk_cmd_seq(self) -> int:
        return self._q[_DISK_CMD_SEQ]

    def disk_command(self, cmd: DiskCmd, index: int = 0) -> int:
        """Issue a disk command (agent): store the argument, the command,
        then bump disk_cmd_seq. Returns the seq; wait for
        :meth:`disk_acknowledged`, then read :attr:`disk_result`."""
        cmd = DiskCmd(cmd)
        self._q[_DISK_CMD_ARG] = _u64("index", index)
        self._q[_DISK_CMD] = cmd
        seq = self._q[_DISK_CMD_SEQ] + 1
        self._q[_DISK_CMD_SEQ] = seq
        return seq

    def read_disk_command(self) -> tuple[int, DiskCmd, int]:
        """(disk_cmd_seq, disk_cmd, disk_cmd_arg), seq loaded first (guest side)."""
        seq = self._q[_DISK_CMD_SEQ]
        return seq, self.disk_cmd, self._q[_DISK_CMD_ARG]

    @property
    def disk_ack_seq(self) -> int:
        return self._q[_DISK_ACK_SEQ]

    @disk_ack_seq.setter
    def disk_ack_seq(self, value: int) -> None:
        self._q[_DISK_ACK_SEQ] = _u64("disk_ack_seq", value)

    def disk_acknowledged(self, seq: int) -> bool:
        """True once the guest has carried out disk command ``seq`` (or a later one)."""
        return self._q[_DISK_ACK_SEQ] >= seq

    def wait_disk_acknowledged(self, seq: int, timeout_s: float, poll_s: float = 0.0002) -> bool:
        """Blocking poll of :meth:`disk_acknowledged` for at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._q[_DISK_ACK_SEQ] >= seq:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)

    @property
    def disk_result(self) -> int:
        return self._q[_DISK_RESULT]

    @disk_result.setter
    def disk_result(self, value: int) -> None:
        self._q[_DISK_RESULT] = _u64("disk_result", value)

    @property
    def disk_io_state(self) -> DiskIoState:
        raw = self._q[_DISK_IO_STATE]
        try:
            return DiskIoState(raw)
        except ValueError:
            raise SegmentError(f"control page holds an unknown disk IO state {raw}") from None

    @disk_io_state.setter
    def disk_io_state(self, value: DiskIoState) -> None:
        self._q[_DISK_IO_STATE] = DiskIoState(value)

    @property
    def disk_errno(self) -> int:
        return self._q[_DISK_ERRNO]

    @disk_errno.setter
    def disk_errno(self, value: int) -> None:
        self._q[_DISK_ERRNO] = _u64("disk_errno", value)

    @property
    def io_writes(self) -> int:
        return self._q[_IO_WRITES]

    @io_writes.setter
    def io_writes(self, value: int) -> None:
        self._q[_IO_WRITES] = _u64("io_writes", value)

    @property
    def io_cursor(self) -> int:
        return self._q[_IO_CURSOR]

    @io_cursor.setter
    def io_cursor(self, value: int) -> None:
        self._q[_IO_CURSOR] = _u64("io_cursor", value)

    @property
    def io_rate_wps(self) -> int:
        return self._q[_IO_RATE]

    @io_rate_wps.setter
    def io_rate_wps(self, value: int) -> None:
        self._q[_IO_RATE] = _u64("io_rate_wps", value)

    # ---- workload spec ----------------------------------------------------
    @property
    def workload(self) -> str:
        n = self._q[_WORKLOAD_LEN]
        if n > WORKLOAD_SPEC_MAX_BYTES:
            raise SegmentError(f"control page workload length {n} exceeds {WORKLOAD_SPEC_MAX_BYTES}")
        try:
            return bytes(self._raw[_WORKLOAD_OFF : _WORKLOAD_OFF + n]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SegmentError("control page workload is not valid UTF-8") from exc

    @workload.setter
    def workload(self, value: str) -> None:
        if not isinstance(value, str):
            raise ValueError(f"workload must be a str, got {value!r}")
        data = value.encode("utf-8")
        if len(data) > WORKLOAD_SPEC_MAX_BYTES:
            raise ValueError(
                f"workload spec is {len(data)} bytes UTF-8, at most {WORKLOAD_SPEC_MAX_BYTES} fit"
            )
        self._q[_WORKLOAD_LEN] = 0
        self._raw[_WORKLOAD_OFF:_WORKLOAD_END] = data + bytes(WORKLOAD_SPEC_MAX_BYTES - len(data))
        self._q[_WORKLOAD_LEN] = len(data)

    # ---- vCPU state -------------------------------------------------------
    def vcpu_state(self, *, allow_running: bool = False) -> bytes:
        """msgpack of {"writes", "seed", "cursor", "workload"}, plus
        "io_writes" and "io_cursor" once the guest has written a disk (a VM
        that never did sends the old four-key blob, which agents from before
        disks load too).

        Only meaningful while the guest is paused or stopped (or was never
        started): a running guest keeps changing writes/cursor. Raises
        GuestError if guest_state is RUNNING, unless ``allow_running`` (e.g.
        to salvage the last state a crashed guest stored).
        """
        if not allow_running and self._q[_GUEST_STATE] == GuestState.RUNNING:
            raise GuestError("vCPU state requested while the guest is running; pause it first")
        state = {
            "writes": self.writes,
            "seed": self.seed,
            "cursor": self.cursor,
            "workload": self.workload,
        }
        io_writes, io_cursor = self.io_writes, self.io_cursor
        if io_writes or io_cursor:
            state["io_writes"] = io_writes
            state["io_cursor"] = io_cursor
        return msgpack.packb(state, use_bin_type=True)

    def load_vcpu_state(self, blob: bytes) -> None:
        """Install a vCPU state produced by :meth:`vcpu_state` (no guest may
        be running on this segment; a paused one reloads it on resume). Strict: SegmentError on anything but a
        map with exactly the four keys (an old blob: io_writes and io_cursor
        become 0) or the four plus "io_writes" and "io_cursor", u64 ints, a
        workload spec that parses and fits this segment, and a cursor below
        npages. (The disk cursor is taken modulo the disks' working set by
        the guest; the disks are checked by memstore.disk, not here.)"""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise SegmentError(f"vCPU state must be bytes, got {type(blob).__name__}")
        if len(blob) > _VCPU_BLOB_MAX_BYTES:
            raise SegmentError(f"vCPU state blob is {len(blob)} bytes, limit {_VCPU_BLOB_MAX_BYTES}")
        try:
            state = msgpack.unpackb(
                blob, raw=False, strict_map_key=True, max_map_len=8, max_array_len=8
            )
        except Exception as exc:  # msgpack raises several unrelated types
            raise SegmentError(f"vCPU state is not valid msgpack: {exc}") from exc
        if not isinstance(state, dict) or set(state) not in (_VCPU_KEYS, _VCPU_KEYS | _VCPU_IO_KEYS):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise SegmentError(f"vCPU state must be a map with keys {sorted(_VCPU_KEYS)} "
                               f"(and optionally {sorted(_VCPU_IO_KEYS)}), got {got}")
        state.setdefault("io_writes", 0)
        state.setdefault("io_cursor", 0)
        for key in ("writes", "seed", "cursor", "io_writes", "io_cursor"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MAX:
                raise SegmentError(f"vCPU state {key!r} must be a u64, got {value!r}")
        spec = state["workload"]
        if not isinstance(spec, str) or len(spec.encode("utf-8")) > WORKLOAD_SPEC_MAX_BYTES:
            raise SegmentError(f"vCPU state 'workload' must be a str of <= {WORKLOAD_SPEC_MAX_BYTES} bytes")
        npages = self.npages
        try:
            validate_for(parse_workload(spec), npages * PAGE_SIZE)
        except WorkloadError as exc:
            raise SegmentError(f"vCPU state carries an unusable workload: {exc}") from exc
        if npages and state["cursor"] >= npages:
            raise SegmentError(f"vCPU state cursor {state['cursor']} is outside {npages} pages")
        if self._q[_GUEST_STATE] == GuestState.RUNNING:
            raise GuestError("cannot load vCPU state while the guest runs; pause it first "
                             "(a paused guest takes the new state when it resumes)")
        self.workload = spec
        self.seed = state["seed"]
        self.writes = state["writes"]
        self.cursor = state["cursor"]
        self.io_writes = state["io_writes"]
        self.io_cursor = state["io_cursor"]
