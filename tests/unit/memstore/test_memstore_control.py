import msgpack
import pytest

from memstore.control import (
    CONTROL_SIZE,
    LAYOUT_VERSION,
    MAGIC,
    Cmd,
    ControlBlock,
    DiskCmd,
    DiskIoState,
    GuestState,
)
from memstore.errors import GuestError, SegmentError


@pytest.fixture
def ctl():
    buf = bytearray(CONTROL_SIZE)
    block = ControlBlock(memoryview(buf))
    block.init_header(256)
    block.workload = "uniform:rate=10"
    yield block
    block.release()


def test_header(ctl):
    assert (ctl.magic, ctl.layout_version, ctl.npages) == (MAGIC, LAYOUT_VERSION, 256)
    assert ctl.cmd is Cmd.RUN and ctl.guest_state is GuestState.NOT_STARTED
    assert (ctl.cmd_seq, ctl.ack_seq, ctl.writes, ctl.throttle_pct) == (0, 0, 0, 0)


def test_slots_are_little_endian_u64_at_fixed_offsets():
    buf = bytearray(CONTROL_SIZE)
    block = ControlBlock(memoryview(buf))
    try:
        block.init_header(256)
        block.writes = 0x0102030405060708
        block.heartbeat_ns = 5
        block.ack_seq = 9
        assert buf[0:8] == b"LIVEMIG1"
        assert buf[56:64] == bytes.fromhex("0807060504030201")
        assert int.from_bytes(buf[88:96], "little") == 5
        assert int.from_bytes(buf[104:112], "little") == 9
    finally:
        block.release()


@pytest.mark.parametrize(
    "field, value",
    [("guest_pid", 4242), ("writes", (1 << 64) - 1), ("seed", 123), ("cursor", 7),
     ("rate_pps", 20000), ("heartbeat_ns", 10**18), ("cmd_seq", 3), ("ack_seq", 2),
     ("throttle_pct", 99), ("throttle_pct", 0)],
)
def test_field_round_trip(ctl, field, value):
    setattr(ctl, field, value)
    assert getattr(ctl, field) == value


@pytest.mark.parametrize(
    "field, value",
    [("writes", -1), ("writes", 1 << 64), ("seed", 1.0), ("throttle_pct", 100),
     ("throttle_pct", -1), ("guest_pid", True)],
)
def test_field_rejects(ctl, field, value):
    with pytest.raises(ValueError):
        setattr(ctl, field, value)


def test_enums(ctl):
    ctl.cmd = Cmd.STOP
    assert ctl.cmd is Cmd.STOP
    ctl.guest_state = GuestState.PAUSED
    assert ctl.guest_state is GuestState.PAUSED
    with pytest.raises(ValueError):
        ctl.cmd = 7
    ctl._q[3] = 77  # corrupt cmd slot
    with pytest.raises(SegmentError, match="unknown command"):
        ctl.cmd


def test_command_and_ack(ctl):
    s1 = ctl.command(Cmd.PAUSE)
    assert (s1, ctl.cmd, ctl.cmd_seq) == (1, Cmd.PAUSE, 1)
    assert ctl.read_command() == (1, Cmd.PAUSE)
    assert not ctl.acknowledged(s1)
    assert not ctl.wait_acknowledged(s1, timeout_s=0.005)
    ctl.ack_seq = 1
    assert ctl.acknowledged(s1) and ctl.wait_acknowledged(s1, timeout_s=0)
    s2 = ctl.set_throttle(40)
    assert s2 == 2 and ctl.throttle_pct == 40 and not ctl.acknowledged(s2)
    ctl.ack_seq = 5
    assert ctl.acknowledged(s2)


def test_workload_field(ctl):
    ctl.workload = "hotset:ws=64M,rate=20000"
    assert ctl.workload == "hotset:ws=64M,rate=20000"
    ctl.workload = "idle"
    assert ctl.workload == "idle"
    ctl.workload = "x" * 512
    assert len(ctl.workload) == 512
    with pytest.raises(ValueError, match="at most 512"):
        ctl.workload = "é" * 257  # 514 bytes UTF-8
    ctl.workload = "ünïcode"
    assert ctl.workload == "ünïcode"


def test_vcpu_state_round_trip(ctl):
    ctl.writes, ctl.seed, ctl.cursor = 1000, 99, 17
    ctl.guest_state = GuestState.PAUSED
    blob = ctl.vcpu_state()
    assert msgpack.unpackb(blob) == {"writes": 1000, "seed": 99, "cursor": 17,
                                     "workload": "uniform:rate=10"}
    buf = bytearray(CONTROL_SIZE)
    other = ControlBlock(memoryview(buf))
    try:
        other.init_header(256)
        other.load_vcpu_state(blob)
        assert (other.writes, other.seed, other.cursor, other.workload) == (1000, 99, 17,
                                                                         "uniform:rate=10")
        assert other.vcpu_state() == blob
    finally:
        other.release()


def test_vcpu_state_refused_while_running(ctl):
    ctl.guest_state = GuestState.RUNNING
    with pytest.raises(GuestError):
        ctl.vcpu_state()
    assert msgpack.unpackb(ctl.vcpu_state(allow_running=True))["writes"] == 0
    with pytest.raises(GuestError):
        ctl.load_vcpu_state(msgpack.packb({"writes": 1, "seed": 2, "cursor": 0, "workload": "idle"}))
    ctl.guest_state = GuestState.PAUSED        # a paused guest takes it on resume
    ctl.load_vcpu_state(msgpack.packb({"writes": 1, "seed": 2, "cursor": 0, "workload": "idle"}))
    assert ctl.writes == 1


def _blob(**over):
    state = {"writes": 1, "seed": 2, "cursor": 3, "workload": "idle"}
    state.update(over)
    return msgpack.packb({k: v for k, v in state.items() if v is not ...})


@pytest.mark.parametrize(
    "blob, msg",
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2, 3, 4]), "must be a map"),
        (msgpack.packb({"writes": 1}), "must be a map"),
        (_blob(extra=5), "must be a map"),
        (_blob(seed=...), "must be a map"),
        (_blob(writes=-1), "'writes' must be a u64"),
        (_blob(writes=True), "'writes' must be a u64"),
        (_blob(seed="7"), "'seed' must be a u64"),
        (_blob(cursor=1.5), "'cursor' must be a u64"),
        (_blob(cursor=256), "outside 256 pages"),
        (_blob(workload=b"idle"), "'workload' must be a str"),
        (_blob(workload="x" * 600), "'workload' must be a str"),
        (_blob(workload="zipf:rate=1"), "unusable workload"),
        (_blob(workload="hotset:ws=2M,rate=1"), "unusable workload"),
        (_blob(io_writes=5), "must be a map"),                 # io keys come as a pair
        (_blob(io_writes=5, io_cursor=-1), "'io_cursor' must be a u64"),
        (_blob(io_writes="5", io_cursor=0), "'io_writes' must be a u64"),
        (_blob(workload="idle:io=5,iows=100"), "unusable workload"),
        (msgpack.packb({"writes": 1, "seed": 2, "cursor": 3, "workload": "idle"}) + b"\x00",
         "not valid msgpack"),
        (b"\xdf\xff\xff\xff\xff", "not valid msgpack"),  # map claiming 4 G entries
        (b"\x00" * 5000, "limit"),
        ("text", "must be bytes"),
    ],
)
def test_load_vcpu_state_is_strict(ctl, blob, msg):
    ctl.io_writes, ctl.io_cursor = 40, 4
    before = (ctl.writes, ctl.seed, ctl.cursor, ctl.workload, ctl.io_writes, ctl.io_cursor)
    with pytest.raises(SegmentError, match=msg):
        ctl.load_vcpu_state(blob)
    assert (ctl.writes, ctl.seed, ctl.cursor, ctl.workload, ctl.io_writes, ctl.io_cursor) == before


def test_control_block_needs_a_full_writable_page():
    with pytest.raises(ValueError):
        ControlBlock(memoryview(bytearray(100)))
    with pytest.raises(ValueError):
        ControlBlock(memoryview(bytes(CONTROL_SIZE)))


def _other():
    buf = bytearray(CONTROL_SIZE)
    other = ControlBlock(memoryview(buf))
    other.init_header(256)
    return other


def test_vcpu_state_round_trip_with_disk_io(ctl):
    ctl.workload = "hotset:ws=64K,rate=10,io=2000,iows=256M"
    ctl.writes, ctl.seed, ctl.cursor = 1000, 99, 17
    ctl.io_writes, ctl.io_cursor = 5555, 42
    ctl.guest_state = GuestState.PAUSED
    blob = ctl.vcpu_state()
    assert msgpack.unpackb(blob) == {"writes": 1000, "seed": 99, "cursor": 17,
                                     "workload": "hotset:ws=64K,rate=10,io=2000,iows=256M",
                                     "io_writes": 5555, "io_cursor": 42}
    other = _other()
    try:
        other.io_writes = 7
        other.load_vcpu_state(blob)
        assert (other.writes, other.io_writes, other.io_cursor) == (1000, 5555, 42)
        assert other.vcpu_state() == blob
    finally:
        other.release()


def test_old_vcpu_blob_still_loads_and_no_io_keeps_the_old_blob(ctl):
    old = msgpack.packb({"writes": 10, "seed": 2, "cursor": 3, "workload": "uniform:rate=10"})
    ctl.io_writes, ctl.io_cursor = 99, 9          # left from something earlier
    ctl.load_vcpu_state(old)
    assert (ctl.writes, ctl.io_writes, ctl.io_cursor) == (10, 0, 0)
    assert ctl.vcpu_state() == old                 # a VM without disk IO sends the old blob


def test_disk_slots_and_command_handshake(ctl):
    raw = ctl._raw
    assert (ctl.ndisks, ctl.disk_cmd, ctl.disk_cmd_seq, ctl.disk_ack_seq) == (0, DiskCmd.RUN, 0, 0)
    assert ctl.disk_io_state is DiskIoState.NOT_STARTED and ctl.disk_acknowledged(0)
    ctl.ndisks = 3
    seq = ctl.disk_command(DiskCmd.REOPEN, 2)
    assert seq == 1 and not ctl.disk_acknowledged(seq)
    assert ctl.read_disk_command() == (1, DiskCmd.REOPEN, 2)
    assert int.from_bytes(raw[120:128], "little") == 3          # ndisks
    assert int.from_bytes(raw[128:136], "little") == 2          # disk_cmd
    assert int.from_bytes(raw[136:144], "little") == 2          # disk_cmd_arg
    assert int.from_bytes(raw[144:152], "little") == 1          # disk_cmd_seq
    assert not ctl.wait_disk_acknowledged(seq, 0.001)
    ctl.disk_result, ctl.disk_io_state, ctl.disk_ack_seq = 2, DiskIoState.PAUSED, seq   # as the guest
    assert ctl.wait_disk_acknowledged(seq, 0.001) and ctl.disk_result == 2
    assert int.from_bytes(raw[152:160], "little") == 1
    assert int.from_bytes(raw[168:176], "little") == DiskIoState.PAUSED
    ctl.io_writes, ctl.io_cursor, ctl.io_rate_wps, ctl.disk_errno = 7, 8, 9, 28
    assert [int.from_bytes(raw[o:o + 8], "little") for o in (176, 184, 192, 200)] == [28, 7, 8, 9]
    assert ctl.cmd_seq == 0                                      # the RAM channel is separate
    with pytest.raises(ValueError):
        ctl.ndisks = 17
    raw[128:136] = (9).to_bytes(8, "little")
    with pytest.raises(SegmentError, match="unknown disk command"):
        ctl.disk_cmd
