"""Fixtures for memstore tests: unique segment names, and segments and guest
processes that are always cleaned up (helpers live in memstore_testlib)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import psutil
import pytest

from memstore.control import Cmd, GuestState
from memstore.guest import find_guests, launch_guest
from memstore.segment import GuestRam, list_segments, unlink_segment
from memstore_testlib import WAIT_S, wait_for


def _kill_and_reap(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + WAIT_S
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.001)  # poll: until the process is reaped, under a deadline


@pytest.fixture
def shm_prefix() -> Iterator[str]:
    """A unique name prefix; at teardown every guest and /dev/shm file under
    it is killed / removed."""
    prefix = f"livemig-test-{uuid.uuid4().hex[:8]}"
    yield prefix
    leftover = [pid for pids in find_guests(prefix).values() for pid in pids]
    _kill_and_reap(leftover)
    for name in list_segments(prefix):
        unlink_segment(name)


@pytest.fixture
def make_ram(shm_prefix: str) -> Iterator[Callable[..., GuestRam]]:
    """make_ram(suffix, size_bytes) -> a created GuestRam, closed and unlinked
    at teardown."""
    made: list[GuestRam] = []

    def make(suffix: str = "vm", size_bytes: int = 1 << 20) -> GuestRam:
        ram = GuestRam.create(f"{shm_prefix}-{suffix}", size_bytes)
        made.append(ram)
        return ram

    yield make
    for ram in made:
        try:
            ram.close()
        finally:
            ram.unlink()


@pytest.fixture
def guests(make_ram: Callable[..., GuestRam]) -> Iterator[Callable[..., subprocess.Popen]]:
    """guests(ram, workload, seed=..., start=Cmd.RUN, log_path=None) -> Popen.

    Sets the workload/seed, optionally presets a command, launches the guest
    and waits until it reports RUNNING/PAUSED. Torn down before the
    segments: any guest still alive is killed and reaped."""
    procs = []

    def launch(ram: GuestRam, workload: str | None = None, *, seed: int = 1,
               start: Cmd | None = None, log_path: str | None = None, wait: bool = True):
        if workload is not None:
            ram.ctl.workload = workload
            ram.ctl.seed = seed
        seq = ram.ctl.command(start) if start is not None else 0
        proc = launch_guest(ram.name, log_path=log_path)
        procs.append(proc)
        if wait:
            wait_for(lambda: (ram.ctl.guest_state in (GuestState.RUNNING, GuestState.PAUSED)
                              and ram.ctl.acknowledged(seq)) or proc.poll() is not None,
                     what="guest start")
            assert proc.poll() is None, f"guest exited early with {proc.returncode}"
        return proc

    yield launch
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT_S)


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[str]:
    """A real 8 MiB tmpfs mounted for the test (needs root; skipped with the
    reason otherwise), unmounted at teardown. The test must leave it empty."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a test tmpfs (root needed): {res.stderr.strip() or res.returncode}")
    try:
        yield str(mnt)
        left = os.listdir(mnt)
        assert not left, f"files left on the test tmpfs: {left}"
    finally:
        res = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
            pytest.fail(f"test tmpfs was busy at teardown: {res.stderr.strip()}")


@pytest.fixture
def disk_vm(make_ram, tmp_path):
    """disk_vm(suffix, ram_bytes, disk_sizes, dir=tmp_path) -> (GuestRam, [image paths]):
    a segment with sparse images created and registered as its disks. The
    maps go with the segment (shm_prefix teardown), the images with tmp_path."""
    from memstore.disk import DiskImage, add_disk

    def make(suffix: str = "vm", ram_bytes: int = 1 << 20, disk_sizes=(4 << 20,), dir=None):
        ram = make_ram(suffix, ram_bytes)
        paths = []
        for i, size in enumerate(disk_sizes):
            path = os.path.join(str(dir or tmp_path), f"{suffix}-disk{i}.img")
            DiskImage.create(path, size).close()
            add_disk(ram, path)
            paths.append(path)
        return ram, paths

    return make
