"""The guest process: commands and acks, pacing, throttle, vCPU state
continuity, signals, sessions, and its exit codes. Real processes on real
/dev/shm segments; every wait is a deadline-bounded poll."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time

import msgpack
import psutil
import pytest

from memstore.control import Cmd, GuestState
from memstore.guest import (
    EXIT_ATTACH,
    EXIT_BUSY,
    EXIT_OK,
    EXIT_UNLINKED,
    find_guests,
    is_guest_process,
    launch_guest,
    make_writer,
)
from memstore.layout import PAGE_SIZE
from memstore.workload import page_for_write, parse_workload

from memstore_testlib import command, wait_for

ROTATE = (PAGE_SIZE - 16) // 8


def measure_rate(ram, n_writes: int, timeout_s: float = 10.0) -> float:
    """Writes/s achieved while the guest makes ``n_writes`` more writes."""
    w0, t0 = ram.ctl.writes, time.monotonic()
    wait_for(lambda: ram.ctl.writes >= w0 + n_writes, timeout_s, what=f"{n_writes} writes")
    return (ram.ctl.writes - w0) / (time.monotonic() - t0)


def wait_heartbeat_after(ram, delta_ns: int) -> None:
    """Wait until the guest's heartbeat is ``delta_ns`` past now (it is alive
    and looping for that long)."""
    target = time.monotonic_ns() + delta_ns
    wait_for(lambda: ram.ctl.heartbeat_ns >= target, what="guest heartbeat")


# --- the write loop, in process ----------------------------------------------

@pytest.mark.parametrize(
    "spec", ["uniform:rate=1", "hotset:ws=40K,rate=1", "sequential:rate=1", "idle"]
)
def test_writer_matches_page_for_write(spec):
    npages, seed = 37, 0xDEADBEEF12345678
    wl = parse_workload(spec)
    ram = memoryview(bytearray(npages * PAGE_SIZE))
    dirty = memoryview(bytearray(npages))
    write = make_writer(wl, npages, seed, ram, dirty)
    counter, cursor = write(1000, 35, 300)
    if wl.kind == "idle":
        assert (counter, cursor) == (1000, 35) and not any(dirty)
        return
    assert counter == 1300
    last, c = {}, 35
    for k in range(1001, 1301):
        page, c = page_for_write(wl, npages, seed, k, c)
        last[page] = k
    assert cursor == c
    assert {p for p in range(npages) if dirty[p]} == set(last)
    for page, k in last.items():
        assert struct.unpack_from("<QQ", ram, page * PAGE_SIZE) == (k, seed ^ page)
        assert struct.unpack_from("<Q", ram, page * PAGE_SIZE + 16 + (k % ROTATE) * 8)[0] == k


# --- commands ------------------------------------------------------------------

def test_pause_resume_stop_acks(make_ram, guests):
    ram = make_ram("cmd", 1 << 20)
    proc = guests(ram, "uniform:rate=20000", seed=3)
    assert ram.ctl.guest_pid == proc.pid
    assert is_guest_process(proc.pid, ram.name)
    assert not is_guest_process(proc.pid, ram.name + "x")
    assert not is_guest_process(os.getpid(), ram.name)
    assert find_guests(ram.name) == {ram.name: [proc.pid]}
    latencies = []
    for _ in range(10):
        latencies.append(command(ram, Cmd.PAUSE))
        assert ram.ctl.guest_state is GuestState.PAUSED and ram.ctl.rate_pps == 0
        latencies.append(command(ram, Cmd.RUN))
        assert ram.ctl.guest_state is GuestState.RUNNING
    # a tick is <= 1 ms (+ sleep overshoot); allow for a loaded CI machine
    assert sorted(latencies)[len(latencies) // 2] < 0.02
    seq = ram.ctl.set_throttle(50)
    assert ram.ctl.wait_acknowledged(seq, 5)
    command(ram, Cmd.STOP)
    assert proc.wait(5) == EXIT_OK
    assert ram.ctl.guest_state is GuestState.STOPPED


def test_writes_advance_only_while_running(make_ram, guests):
    ram = make_ram("adv", 1 << 20)
    guests(ram, "hotset:ws=64K,rate=50000")
    wait_for(lambda: ram.ctl.writes > 1000, what="writes")
    assert ram.dirty.tobytes().count(0) < ram.npages  # it marks pages
    command(ram, Cmd.PAUSE)
    frozen, image = ram.ctl.writes, bytes(ram.ram)
    wait_heartbeat_after(ram, 50_000_000)  # alive and polling for 50 ms more
    assert ram.ctl.writes == frozen and bytes(ram.ram) == image
    command(ram, Cmd.RUN)
    wait_for(lambda: ram.ctl.writes > frozen + 1000, what="writes after resume")


def test_starts_paused_when_told(make_ram, guests):
    ram = make_ram("sp", 1 << 20)
    guests(ram, "uniform:rate=50000", start=Cmd.PAUSE)
    assert ram.ctl.guest_state is GuestState.PAUSED
    wait_heartbeat_after(ram, 20_000_000)
    assert ram.ctl.writes == 0 and not any(ram.dirty)


@pytest.mark.parametrize("standby", [False, True], ids=["launched-after-load", "standby-guest"])
def test_vcpu_state_continues_exactly_on_another_segment(make_ram, guests, standby):
    for spec, seed in [("uniform:rate=5000", 11), ("sequential:rate=5000", 12),
                       ("hotset:ws=256K,rate=5000", 13)]:
        src = make_ram(f"src-{seed}", 1 << 20)
        dst = make_ram(f"dst-{seed}", 1 << 20)
        wl = parse_workload(spec)
        p1 = guests(src, spec, seed=seed)
        wait_for(lambda: src.ctl.writes >= 300, what="source writes")
        command(src, Cmd.PAUSE)
        blob = src.ctl.vcpu_state()
        state = msgpack.unpackb(blob)
        n0, c0 = state["writes"], state["cursor"]
        assert (state["seed"], state["workload"]) == (seed, spec)
        command(src, Cmd.STOP)  # the VM must run in one place only
        assert p1.wait(5) == EXIT_OK
        assert src.ctl.vcpu_state() == blob  # stopping changed nothing

        dst.ram[:] = src.ram
        if standby:
            # As a migration destination does: the guest is launched paused
            # during setup and the vCPU state arrives while it waits.
            p2 = guests(dst, "idle", seed=999, start=Cmd.PAUSE)
            assert dst.ctl.guest_state == GuestState.PAUSED
            dst.ctl.load_vcpu_state(blob)
        else:
            dst.ctl.load_vcpu_state(blob)
            p2 = guests(dst, start=Cmd.PAUSE)
        assert dst.ctl.writes == n0 and not any(dst.dirty)
        command(dst, Cmd.RUN)
        wait_for(lambda: dst.ctl.writes >= n0 + 200, what="destination writes")
        command(dst, Cmd.PAUSE)
        n1 = dst.ctl.writes
        last, cursor = {}, c0
        for k in range(n0 + 1, n1 + 1):
            page, cursor = page_for_write(wl, dst.npages, seed, k, cursor)
            last[page] = k
        assert dst.ctl.cursor == cursor
        assert {p for p in range(dst.npages) if dst.dirty[p]} == set(last)
        for page in range(dst.npages):
            off = page * PAGE_SIZE
            if page in last:
                k = last[page]
                assert struct.unpack_from("<QQ", dst.ram, off) == (k, seed ^ page)
                assert struct.unpack_from("<Q", dst.ram, off + 16 + (k % ROTATE) * 8)[0] == k
            else:
                assert dst.ram[off : off + PAGE_SIZE] == src.ram[off : off + PAGE_SIZE]
        command(dst, Cmd.STOP)
        assert p2.wait(5) == EXIT_OK


# --- pacing ----------------------------------------------------------------------

def test_rate_and_throttle(make_ram, guests):
    ram = make_ram("rate", 4 << 20)
    guests(ram, "uniform:rate=20000")
    rate = measure_rate(ram, 10_000)  # ~0.5 s
    assert 16_000 <= rate <= 24_000, rate
    wait_for(lambda: ram.ctl.rate_pps, what="a rate_pps window")  # first ~1 s window
    assert 16_000 <= ram.ctl.rate_pps <= 24_000, ram.ctl.rate_pps
    seq = ram.ctl.set_throttle(75)
    assert ram.ctl.wait_acknowledged(seq, 5)
    throttled = measure_rate(ram, 2_500)  # ~0.5 s at 5,000/s
    assert 3_750 <= throttled <= 6_250, throttled
    seq = ram.ctl.set_throttle(0)
    assert ram.ctl.wait_acknowledged(seq, 5)
    assert 16_000 <= measure_rate(ram, 5_000) <= 24_000


def test_no_burst_after_pause(make_ram, guests):
    ram = make_ram("burst", 1 << 20)
    guests(ram, "uniform:rate=2000")
    command(ram, Cmd.PAUSE)
    wait_heartbeat_after(ram, 200_000_000)  # 200 ms paused = 400 writes "owed"
    w0 = ram.ctl.writes
    command(ram, Cmd.RUN)
    t0 = time.monotonic_ns()
    wait_heartbeat_after(ram, 20_000_000)
    elapsed_s = (time.monotonic_ns() - t0) / 1e9
    assert ram.ctl.writes - w0 <= 2000 * elapsed_s + 20  # no catch-up of the pause


def test_idle_writes_nothing_and_stays_cheap(make_ram, guests):
    ram = make_ram("idle", 1 << 20)
    proc = guests(ram, "idle")
    ps = psutil.Process(proc.pid)
    cpu0, t0 = sum(ps.cpu_times()[:2]), time.monotonic()
    wait_heartbeat_after(ram, 300_000_000)
    cpu_share = (sum(ps.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
    assert ram.ctl.writes == 0 and not any(ram.dirty) and ram.ctl.rate_pps == 0
    assert cpu_share < 0.5, cpu_share
    latencies = [command(ram, c) for c in (Cmd.PAUSE, Cmd.RUN) * 5]
    assert sorted(latencies)[len(latencies) // 2] < 0.02


# --- signals, sessions, failures -------------------------------------------------

def test_sigterm_stops_like_stop(make_ram, guests):
    ram = make_ram("term", 1 << 20)
    proc = guests(ram, "uniform:rate=20000")
    wait_for(lambda: ram.ctl.writes > 100, what="writes")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == EXIT_OK
    assert ram.ctl.guest_state is GuestState.STOPPED
    final = ram.ctl.writes
    assert final > 100 and ram.ctl.vcpu_state()  # state is readable after the stop


def test_guest_survives_its_parents_process_group(make_ram, shm_prefix):
    ram = make_ram("sess", 1 << 20)
    ram.ctl.workload = "uniform:rate=1000"
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__import__("memstore").__file__)))
    code = (
        "import sys, time\n"
        "from memstore.guest import launch_guest\n"
        f"p = launch_guest({ram.name!r})\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"  # ok: a stand-in parent that the test kills
    )
    env = dict(os.environ, PYTHONPATH=pkg_root)
    # The stand-in agent gets its own session so the signal below cannot hit pytest.
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        guest_pid = int(parent.stdout.readline())
        wait_for(lambda: ram.ctl.guest_state is GuestState.RUNNING, what="guest start")
        assert os.getpgid(guest_pid) != os.getpgid(parent.pid)
        os.killpg(parent.pid, signal.SIGINT)  # Ctrl-C to the agent's process group
        os.killpg(parent.pid, signal.SIGTERM)
        assert parent.wait(5) != 0
        w = ram.ctl.writes
        wait_heartbeat_after(ram, 50_000_000)  # the guest still loops...
        wait_for(lambda: ram.ctl.writes > w + 10, what="writes after the parent died")
        assert is_guest_process(guest_pid, ram.name)
        command(ram, Cmd.STOP)
        wait_for(lambda: not is_guest_process(guest_pid, ram.name), what="guest exit")
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait(5)
        parent.stdout.close()


def test_missing_segment_exits_2(shm_prefix, tmp_path):
    log = tmp_path / "guest.log"
    proc = launch_guest(f"{shm_prefix}-nothere", log_path=str(log))
    assert proc.wait(5) == EXIT_ATTACH
    assert "cannot attach segment" in log.read_text()


def test_bad_workload_exits_2(make_ram, tmp_path):
    ram = make_ram("badwl", 1 << 20)
    ram.ctl.workload = "hotset:ws=4M,rate=1"  # bigger than the VM
    log = tmp_path / "guest.log"
    proc = launch_guest(ram.name, log_path=str(log))
    assert proc.wait(5) == EXIT_ATTACH
    assert "does not fit" in log.read_text()


def test_second_guest_on_same_segment_refused(make_ram, guests, tmp_path):
    ram = make_ram("busy", 1 << 20)
    first = guests(ram, "idle")
    log = tmp_path / "guest.log"
    second = launch_guest(ram.name, log_path=str(log))
    assert second.wait(5) == EXIT_BUSY
    assert f"already has a guest, pid {first.pid}" in log.read_text()
    assert ram.ctl.guest_pid == first.pid and first.poll() is None


def test_guest_exits_when_segment_unlinked(make_ram, guests):
    ram = make_ram("gone", 1 << 20)
    proc = guests(ram, "idle")
    ram.unlink()
    assert proc.wait(5) == EXIT_UNLINKED
