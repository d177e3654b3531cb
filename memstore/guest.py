"""The guest process ("the vCPU"): ``python -m memstore.guest SEGMENT_NAME``.

One process per VM. It attaches the segment, takes its workload spec and
vCPU state (seed, writes, cursor, io_writes, io_cursor) from the control
page, opens its disks (memstore.disk), publishes its pid,
and loops in ticks of at most ~1 ms (sleep TICK_S + overshoot):

1. ``heartbeat_ns`` = now (CLOCK_MONOTONIC, shared by all processes on the
   host); every ~1 s ``rate_pps`` = writes per second achieved over the last
   window; every ~1 s a check that the segment file still exists.
2. Load ``cmd_seq`` then ``cmd`` (see memstore.control for why this order):

   * PAUSE: store writes/cursor, guest_state = PAUSED, rate_pps = 0,
     ack_seq = cmd_seq; then poll every 0.2 ms until cmd is RUN (guest_state
     = RUNNING, ack) or STOP. Paused, it writes nothing but heartbeat_ns and
     ack_seq.
   * STOP (or SIGTERM/SIGINT): store writes/cursor, guest_state = STOPPED,
     ack, unmap, exit 0.
   * RUN: guest_state = RUNNING, apply throttle_pct, ack a new cmd_seq.

3. Write the pages that are due: the target rate is ``rate × (1 −
   throttle_pct/100)`` pages/s, counted from the start of the current pacing
   window (reset on resume and on a throttle change). A backlog larger than
   CATCHUP_NS worth of writes is dropped, so a stalled guest never bursts,
   and at most BATCH_MAX writes happen between two command checks. Each
   write::

        counter += 1
        page, cursor = page_for_write(workload, npages, seed, counter, cursor)
        ram[page][0:16]  = <QQ counter, seed ^ page        (never all zero)
        ram[page][16 + (counter % 510) * 8 : +8] = <Q counter
        dirty[page] = 1                                   (page first, then mark)

   then ``writes``/``cursor`` go to the control page.
4. Disk writes that are due (workload ``io=N``, paced like the RAM writes
   and throttled by the same percentage; at most IO_BATCH_MAX per tick),
   spread over the disks by :func:`memstore.workload.disk_write_for`.
   Each one is a whole block (64 KiB)::

        io_counter += 1
        disk, block, io_cursor = disk_write_for(workload, ws_blocks, seed, io_counter, io_cursor)
        block[0:16] = <QQ io_counter, seed ^ (disk << 56) ^ block   (never all zero)
        block[16 + (io_counter % slots) * 8 : +8] = <Q io_counter, rest a seed pattern
        pwrite(disk fd, block, block * 64K)
        disk map dirty[block] = 1                         (data first, then mark)

   then ``io_writes``/``io_cursor`` go to the control page. A failed pwrite
   (ENOSPC, EIO) marks the block anyway (it may be partly written), stores
   disk_errno and stops disk IO (disk_io_state FAILED) until a disk RUN; the
   write is retried then with the same counter. RAM writes go on.
5. Disk commands (disk_cmd_seq differs from the last one seen), checked
   every tick, also while RAM-paused: PAUSE / RUN the disk IO, REOPEN disk
   i at the path staged in its map (see memstore.disk), each acknowledged
   through disk_result, disk_io_state, disk_ack_seq.
6. Sleep TICK_S (0.8 ms) unless more writes are already due.

The write loop is :func:`page_for_write` inlined per workload kind (tests
check that both agree): ~0.4-0.6 us per write. Measured on the 2-vCPU
reference VM at rate=10000000 (CPU-bound): hotset ~1.7-2.0 M writes/s,
uniform ~1.5-1.65 M, sequential ~2.8-2.9 M. Command latency ≤ ~1 ms
running, ≤ ~0.3 ms paused; CPU ~2 % idle, ~7 % paused (0.2 ms polls),
~14 % at 200,000 writes/s.

The guest runs in its own session (:func:`launch_guest`), so a Ctrl-C or
SIGTERM to the agent's process group does not reach it and it outlives the
agent; the agent finds it again by its command line
(:func:`is_guest_process`, :func:`find_guests`). If the segment file is
unlinked the guest exits by itself (nobody can attach to it any more).

Exit codes: 0 stopped (STOP, SIGTERM, SIGINT); 1 unexpected error; 2 the
segment cannot be attached, its workload is unusable or one of its disks
(memstore.disk: the control page's ndisks, each map's path) cannot be opened; 3 another guest
already runs on the segment; 4 the segment file was unlinked.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from typing import Callable

import psutil

from .control import Cmd, DiskCmd, DiskIoState, GuestState
from .disk import DiskMap
from .errors import DiskError, GuestError, MemstoreError
from .layout import PAGE_SHIFT, PAGE_SIZE
from .segment import GuestRam, segment_path
from .workload import Workload, disk_write_for, io_ws_blocks, parse_workload, validate_for

__all__ = [
    "GUEST_MODULE",
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_ATTACH",
    "EXIT_BUSY",
    "EXIT_UNLINKED",
    "launch_guest",
    "guest_command",
    "is_guest_process",
    "find_guests",
    "make_writer",
    "main",
]

GUEST_MODULE = "memstore.guest"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_ATTACH = 2
EXIT_BUSY = 3
EXIT_UNLINKED = 4

TICK_S = 0.0008  # + sleep overshoot and loop work: a tick stays <= ~1 ms
PAUSE_POLL_S = 0.0002
BATCH_MAX = 512  # writes between two command checks (~0.5 ms)
CATCHUP_NS = 20_000_000  # backlog beyond this much time is dropped
RATE_WINDOW_NS = 1_000_000_000
IO_BATCH_MAX = 64  # disk writes between two command checks (~1-2 ms of pwrite)
UNLINK_CHECK_NS = 1_000_000_000

_ROTATE_SLOTS = (PAGE_SIZE - 16) // 8  # 510 8-byte slots after the 16-byte header
_M64 = (1 << 64) - 1

_now_ns = time.monotonic_ns  # CLOCK_MONOTONIC on Linux


# ---------------------------------------------------------------------------
# launching and finding guests (agent side)


def guest_command(segment_name: str, python: str = sys.executable) -> list[str]:
    """The argv of a guest for ``segment_name``."""
    segment_path(segment_name)  # validates the name
    return [python, "-m", GUEST_MODULE, segment_name]


def launch_guest(
    segment_name: str, *, python: str = sys.executable, log_path: str | None = None
) -> subprocess.Popen:
    """Start a guest for an existing segment in its own session (so it
    survives the caller's process group and the caller), stdin from
    /dev/null, stdout+stderr appended to ``log_path`` or discarded.

    The caller owns the returned Popen: wait() it (or poll()) after the guest
    exits so it is reaped. After launch, wait for ``ctl.guest_state`` to leave
    NOT_STARTED, or issue a command and wait for its acknowledgement.
    """
    try:
        argv = guest_command(segment_name, python)
    except ValueError as exc:
        raise GuestError(str(exc)) from None
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (pkg_root, env.get("PYTHONPATH", "")) if p
    )
    out = None
    try:
        out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log_path is not None else subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            env=env,
        )
    except OSError as exc:
        raise GuestError(f"cannot launch guest for {segment_name!r}: {exc}") from exc
    finally:
        if log_path is not None and out is not None and out is not subprocess.DEVNULL:
            out.close()


def _guest_segment(cmdline: list[str]) -> str | None:
    for i in range(len(cmdline) - 2):
        if cmdline[i] == "-m" and cmdline[i + 1] == GUEST_MODULE:
            return cmdline[i + 2]
    return None


def is_guest_process(pid: int, segment_name: str) -> bool:
    """True if ``pid`` is a live (non-zombie) guest of ``segment_name``."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return _guest_segment(proc.cmdline()) == segment_name
    except (psutil.Error, OSError):
        return False


def find_guests(prefix: str = "") -> dict[str, list[int]]:
    """Live guests whose segment name starts with ``prefix``:
    {segment_name: [pid, ...]} (more than one pid means trouble)."""
    found: dict[str, list[int]] = {}
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        info = proc.info
        if info.get("status") == psutil.STATUS_ZOMBIE or not info.get("cmdline"):
            continue
        name = _guest_segment(info["cmdline"])
        if name is not None and name.startswith(prefix):
            found.setdefault(name, []).append(info["pid"])
    return found


# ---------------------------------------------------------------------------
# the write loop


def make_writer(
    workload: Workload, npages: int, seed: int, ram: memoryview, dirty: memoryview
) -> Callable[[int, int, int], tuple[int, int]]:
    """Return ``write(counter, cursor, n) -> (counter, cursor)`` that performs
    writes counter+1 .. counter+n exactly as page_for_write() chooses them:
    page contents first, dirty byte second."""
    pack_head = struct.Struct("<QQ").pack_into
    pack_word = struct.Struct("<Q").pack_into
    slots = _ROTATE_SLOTS
    shift = PAGE_SHIFT

    if workload.kind == "sequential":

        def write(counter: int, cursor: int, n: int) -> tuple[int, int]:
            cursor %= npages
            for _ in range(n):
                counter += 1
                page = cursor
                cursor += 1
                if cursor == npages:
                    cursor = 0
                off = page << shift
                pack_head(ram, off, counter, seed ^ page)
                pack_word(ram, off + 16 + (counter % slots) * 8, counter)
                dirty[page] = 1
            return counter, cursor

        return write

    if workload.kind in ("uniform", "hotset"):
        mod = npages if workload.kind == "uniform" else min(workload.ws_bytes // PAGE_SIZE, npages)
        m64 = _M64
        golden, mix1, mix2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB

        def write(counter: int, cursor: int, n: int) -> tuple[int, int]:
            for _ in range(n):
                counter += 1
                z = ((seed ^ counter) + golden) & m64
                z = ((z ^ (z >> 30)) * mix1) & m64
                z = ((z ^ (z >> 27)) * mix2) & m64
                page = (z ^ (z >> 31)) % mod
                off = page << shift
                pack_head(ram, off, counter, seed ^ page)
                pack_word(ram, off + 16 + (counter % slots) * 8, counter)
                dirty[page] = 1
            return counter, cursor

        return write

    def write_nothing(counter: int, cursor: int, n: int) -> tuple[int, int]:
        return counter, cursor

    return write_nothing


class _Disk:
    __slots__ = ("map", "fd", "dirty")

    def __init__(self, dm: DiskMap, fd: int) -> None:
        self.map, self.fd, self.dirty = dm, fd, dm.dirty


def _open_image(path: str, size_bytes: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size_bytes:
            raise DiskError(f"{path} is not a regular file of {size_bytes} bytes", errno=errno.EINVAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _DiskIo:
    """The guest's disk side: its open images, pacing and disk commands."""

    def __init__(self, gr: GuestRam, workload: Workload, seed: int) -> None:
        self.gr = gr
        self.ctl = gr.ctl
        self.disks: list[_Disk] = []
        self.open_disks()
        self.set_workload(workload, seed)
        self.io_writes = self.ctl.io_writes
        self.io_cursor = self.ctl.io_cursor
        self.meas_w0 = self.io_writes
        self.base_rate = workload.io_wps
        self.rate = 0
        self.win_t0 = _now_ns()
        self.win_done = 0
        self.cap = IO_BATCH_MAX
        self.failed = False
        ctl = self.ctl
        seq, cmd, _ = ctl.read_disk_command()
        if ctl.disk_ack_seq >= seq:  # done by an earlier guest on this segment: keep its state
            self.acked: int | None = seq
            self.paused = cmd is DiskCmd.PAUSE or (
                cmd is DiskCmd.REOPEN and ctl.disk_io_state is DiskIoState.PAUSED)
            ctl.disk_io_state = DiskIoState.PAUSED if self.paused else DiskIoState.RUNNING
        else:
            self.acked, self.paused = None, False

    # ---- the disk table ----------------------------------------------------
    def open_disks(self) -> None:
        """Open every disk of the control page's table (MemstoreError/OSError
        if one cannot be opened: the guest does not start without its disks)."""
        self.close()
        for i in range(self.ctl.ndisks):
            dm = DiskMap.attach(self.gr.name, i)
            try:
                fd = _open_image(dm.path, dm.size_bytes)
            except BaseException:
                dm.close()
                raise
            self.disks.append(_Disk(dm, fd))
        self.bufs: dict[int, tuple[bytearray, memoryview, bytes]] = {}

    def set_workload(self, workload: Workload, seed: int) -> None:
        self.workload, self.seed = workload, seed
        self.ws_blocks = io_ws_blocks(workload, [(d.map.size_bytes, d.map.block_size) for d in self.disks])
        self.base_rate = workload.io_wps
        self.bufs = {}

    @property
    def enabled(self) -> bool:
        """Has the workload disk IO and something to write it to?"""
        return bool(self.base_rate and self.disks)

    def close(self) -> None:
        for d in getattr(self, "disks", ()):
            os.close(d.fd)
            d.map.close()
        self.disks = []

    def reload(self, workload: Workload, seed: int) -> None:
        """On RAM resume: the vCPU state (and perhaps the disk table) may be new."""
        if self.ctl.ndisks != len(self.disks):
            self.open_disks()
        self.set_workload(workload, seed)
        self.io_writes = self.ctl.io_writes
        self.io_cursor = self.ctl.io_cursor
        self.meas_w0 = self.io_writes

    def store(self) -> None:
        self.ctl.io_writes = self.io_writes
        self.ctl.io_cursor = self.io_cursor

    # ---- commands ------------------------------------------------------------
    def poll(self, now: int) -> None:
        ctl = self.ctl
        if ctl.disk_cmd_seq == self.acked:
            return
        seq, cmd, arg = ctl.read_disk_command()
        result = 0
        if cmd is DiskCmd.PAUSE:
            self.paused = True
        elif cmd is DiskCmd.RUN:
            self.paused = self.failed = False
            ctl.disk_errno = 0
            self.restart_window(now)
        else:
            result = self.reopen(arg)
        ctl.disk_result = result
        ctl.disk_io_state = (DiskIoState.FAILED if self.failed else
                             DiskIoState.PAUSED if self.paused else DiskIoState.RUNNING)
        ctl.disk_ack_seq = seq
        self.acked = seq

    def reopen(self, index: int) -> int:
        """Switch disk ``index`` to its staged path; 0 or the errno why not
        (the old file is kept then)."""
        if not 0 <= index < len(self.disks):
            return errno.EINVAL
        d = self.disks[index]
        try:
            path = d.map.next_path
            if not path:
                return errno.ENOENT
            fd = _open_image(path, d.map.size_bytes)
        except OSError as exc:
            return exc.errno or errno.EIO
        except MemstoreError as exc:
            return exc.errno or errno.EINVAL
        old, d.fd = d.fd, fd
        os.close(old)
        d.map.commit_path(path)
        return 0

    # ---- writes --------------------------------------------------------------
    def restart_window(self, now: int) -> None:
        self.win_t0, self.win_done = now, 0

    def set_throttle(self, pct: int, now: int) -> None:
        self.rate = self.base_rate * (100 - min(pct, 99)) // 100
        self.cap = max(IO_BATCH_MAX, self.rate * CATCHUP_NS // 1_000_000_000)
        self.restart_window(now)

    def tick(self, now: int) -> bool:
        """Do the disk writes that are due; True if more are due already."""
        if self.paused or self.failed or not self.rate:
            return False
        due = (now - self.win_t0) * self.rate // 1_000_000_000 - self.win_done
        if due > self.cap:  # stalled: forget the backlog instead of bursting
            self.win_done += due - self.cap
            due = self.cap
        if due <= 0:
            return False
        n = due if due < IO_BATCH_MAX else IO_BATCH_MAX
        done = self.write(n)
        self.win_done += n
        self.store()
        return due > n and done == n

    def _buf(self, block_size: int) -> tuple[bytearray, memoryview, bytes]:
        got = self.bufs.get(block_size)
        if got is None:
            words = block_size // 8
            pattern = struct.pack(f"<{words}Q", *(((i * 0x9E3779B97F4A7C15) ^ self.seed) & _M64
                                                 for i in range(words)))
            buf = bytearray(pattern)
            got = self.bufs[block_size] = (buf, memoryview(buf), pattern)
        return got

    def write(self, n: int) -> int:
        """Disk writes io_writes+1 .. +n (fewer if a pwrite fails: then
        FAILED). Returns how many were done."""
        pack_head = _HEAD.pack_into
        pack_word = _WORD.pack_into
        seed, workload, ws_blocks, disks = self.seed, self.workload, self.ws_blocks, self.disks
        for i in range(n):
            k = self.io_writes + 1
            disk, block, cursor = disk_write_for(workload, ws_blocks, seed, k, self.io_cursor)
            d = disks[disk]
            bs = d.map.block_size
            buf, view, pattern = self._buf(bs)
            slot = 16 + (k % ((bs - 16) // 8)) * 8
            pack_head(buf, 0, k, seed ^ (disk << 56) ^ block)
            pack_word(buf, slot, k)
            off = block * bs
            try:
                done = os.pwrite(d.fd, buf, off)
                while done < bs:
                    done += os.pwrite(d.fd, view[done:], off + done)
            except OSError as exc:
                d.dirty[block] = 1  # perhaps partly written: the copier must look
                self.failed = True
                self.ctl.disk_errno = exc.errno or errno.EIO
                self.ctl.disk_io_state = DiskIoState.FAILED
                return i
            finally:
                buf[slot : slot + 8] = pattern[slot : slot + 8]
            d.dirty[block] = 1
            self.io_writes, self.io_cursor = k, cursor
        return n


_HEAD = struct.Struct("<QQ")
_WORD = struct.Struct("<Q")


class _Guest:
    def __init__(self, gr: GuestRam, workload: Workload) -> None:
        self.gr = gr
        self.ctl = gr.ctl
        self.workload = workload
        self.writes = gr.ctl.writes
        self.cursor = gr.ctl.cursor % gr.npages
        self.seed = gr.ctl.seed
        self.write = make_writer(workload, gr.npages, self.seed, gr.ram, gr.dirty)
        self.dio = _DiskIo(gr, workload, self.seed)
        self.acked: int | None = None
        self.signalled = False
        now = _now_ns()
        self.meas_t0 = now
        self.meas_w0 = self.writes
        self.next_unlink_check = now + UNLINK_CHECK_NS

    def on_signal(self, signum: int, frame: object) -> None:
        self.signalled = True

    def store(self) -> None:
        self.ctl.writes = self.writes
        self.ctl.cursor = self.cursor
        self.dio.store()

    def ack(self, seq: int) -> None:
        if seq != self.acked:
            self.ctl.ack_seq = seq
            self.acked = seq

    def housekeeping(self, now: int) -> int | None:
        """Heartbeat, rate window, unlink check; an exit code if we must go."""
        ctl = self.ctl
        ctl.heartbeat_ns = now
        if now - self.meas_t0 >= RATE_WINDOW_NS:
            dt = now - self.meas_t0
            ctl.rate_pps = (self.writes - self.meas_w0) * 1_000_000_000 // dt
            dio = self.dio
            ctl.io_rate_wps = (dio.io_writes - dio.meas_w0) * 1_000_000_000 // dt
            self.meas_t0, self.meas_w0, dio.meas_w0 = now, self.writes, dio.io_writes
        self.dio.poll(now)
        if now >= self.next_unlink_check:
            self.next_unlink_check = now + UNLINK_CHECK_NS
            if os.fstat(self.gr.fd).st_nlink == 0:
                print(f"memstore.guest: segment {self.gr.name!r} was unlinked; exiting",
                      file=sys.stderr)
                return EXIT_UNLINKED
        return None

    def stop(self, seq: int | None) -> int:
        self.store()
        self.ctl.rate_pps = 0
        self.ctl.io_rate_wps = 0
        self.ctl.guest_state = GuestState.STOPPED
        if seq is not None:
            self.ack(seq)
        return EXIT_OK

    def reload(self) -> None:
        """Take the vCPU state from the control page again (on every resume).

        A pause stored our own state there, so this is a no-op after a plain
        pause/resume; after ``load_vcpu_state`` into a paused standby guest
        (a migration destination launches its guest paused during setup, so
        the interpreter start-up is not part of the downtime) the guest
        continues from the shipped state.
        """
        ctl = self.ctl
        self.writes = ctl.writes
        self.cursor = ctl.cursor % self.gr.npages
        spec = ctl.workload
        if ctl.seed != self.seed or spec != self.workload.spec:
            workload = parse_workload(spec)
            validate_for(workload, self.gr.size_bytes)
            self.seed, self.workload = ctl.seed, workload
            self.write = make_writer(workload, self.gr.npages, self.seed, self.gr.ram, self.gr.dirty)
        self.dio.reload(self.workload, self.seed)

    def pause(self, seq: int) -> int | None:
        """Paused until RUN (returns None) or STOP/signal (returns exit code)."""
        ctl = self.ctl
        self.store()
        ctl.rate_pps = 0
        ctl.io_rate_wps = 0
        ctl.guest_state = GuestState.PAUSED
        self.ack(seq)
        while True:
            time.sleep(PAUSE_POLL_S)
            now = _now_ns()
            code = self.housekeeping(now)
            if code is not None:
                return code
            if self.signalled:
                return self.stop(None)
            seq, cmd = ctl.read_command()
            if cmd is Cmd.RUN:
                self.reload()
                ctl.guest_state = GuestState.RUNNING
                self.ack(seq)
                self.meas_t0, self.meas_w0 = now, self.writes
                return None
            if cmd is Cmd.STOP:
                return self.stop(seq)
            self.ack(seq)  # e.g. a throttle change while paused: taken on resume

    def run(self) -> int:
        ctl = self.ctl
        dio = self.dio
        write = self.write
        base_rate = self.workload.rate_pps
        last_pct = -1
        rate = 0
        win_t0 = _now_ns()
        win_done = 0
        cap = BATCH_MAX
        io = False
        running = False
        while True:
            now = _now_ns()
            code = self.housekeeping(now)
            if code is not None:
                return code
            if self.signalled:
                return self.stop(None)
            seq, cmd = ctl.read_command()
            if cmd is Cmd.PAUSE:
                code = self.pause(seq)
                if code is not None:
                    return code
                write, base_rate, last_pct = self.write, self.workload.rate_pps, -1   # reloaded state
                win_t0, win_done, running = _now_ns(), 0, True
                continue
            if cmd is Cmd.STOP:
                return self.stop(seq)
            if not running:
                ctl.guest_state = GuestState.RUNNING
                running = True
            pct = ctl.throttle_pct
            if pct != last_pct:
                last_pct = pct
                rate = base_rate * (100 - min(pct, 99)) // 100
                cap = max(BATCH_MAX, rate * CATCHUP_NS // 1_000_000_000)
                win_t0, win_done = now, 0
                dio.set_throttle(pct, now)
                io = dio.enabled
            self.ack(seq)
            more = False
            if rate:
                due = (now - win_t0) * rate // 1_000_000_000 - win_done
                if due > cap:  # stalled: forget the backlog instead of bursting
                    win_done += due - cap
                    due = cap
                if due > 0:
                    n = due if due < BATCH_MAX else BATCH_MAX
                    self.writes, self.cursor = write(self.writes, self.cursor, n)
                    win_done += n
                    ctl.writes = self.writes
                    ctl.cursor = self.cursor
                    more = due > n
            if io and dio.tick(now):
                more = True
            if not more:  # else: check commands, then keep writing
                time.sleep(TICK_S)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m memstore.guest SEGMENT_NAME", file=sys.stderr)
        return EXIT_ATTACH
    name = args[0]
    try:
        gr = GuestRam.attach(name)
    except MemstoreError as exc:
        print(f"memstore.guest: cannot attach segment {name!r}: {exc}", file=sys.stderr)
        return EXIT_ATTACH
    try:
        try:
            workload = parse_workload(gr.ctl.workload)
            validate_for(workload, gr.size_bytes)
        except MemstoreError as exc:
            print(f"memstore.guest: segment {name!r}: unusable workload: {exc}", file=sys.stderr)
            return EXIT_ATTACH
        other = gr.ctl.guest_pid
        if other and other != os.getpid() and is_guest_process(other, name):
            print(f"memstore.guest: segment {name!r} already has a guest, pid {other}",
                  file=sys.stderr)
            return EXIT_BUSY
        try:
            guest = _Guest(gr, workload)
        except (MemstoreError, OSError) as exc:
            print(f"memstore.guest: segment {name!r}: cannot open its disks: {exc}", file=sys.stderr)
            return EXIT_ATTACH
        signal.signal(signal.SIGTERM, guest.on_signal)
        signal.signal(signal.SIGINT, guest.on_signal)
        gr.ctl.guest_pid = os.getpid()
        try:
            return guest.run()
        finally:
            guest.dio.close()
    except Exception as exc:  # last resort: say why before exiting
        print(f"memstore.guest: segment {name!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        gr.close()


if __name__ == "__main__":
    sys.exit(main())
