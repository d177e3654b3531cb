"""A full /dev/shm is an error, never a SIGBUS: segments, pre-faults and
disk maps in a real 8 MiB tmpfs mounted by the test (LIVEMIG_SHM_DIR)."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys

import pytest

from memstore.control import Cmd
from memstore.disk import DiskMap
from memstore.errors import SegmentError
from memstore.guest import launch_guest
from memstore.segment import SHM_DIR_ENV, GuestRam, list_segments, ram_offset_for, shm_dir
from memstore_testlib import WAIT_S, command, wait_for

MiB = 1 << 20


@pytest.fixture
def full_shm(small_tmpfs, monkeypatch):
    """shm_dir() is the 8 MiB tmpfs for this test; whatever is left in it
    at the end is removed before the tmpfs is checked and unmounted."""
    monkeypatch.setenv(SHM_DIR_ENV, small_tmpfs)
    yield small_tmpfs
    for name in os.listdir(small_tmpfs):
        os.unlink(os.path.join(small_tmpfs, name))


def test_shm_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv(SHM_DIR_ENV, raising=False)
    assert shm_dir() == "/dev/shm"
    monkeypatch.setenv(SHM_DIR_ENV, str(tmp_path))
    assert shm_dir() == str(tmp_path)
    monkeypatch.setenv(SHM_DIR_ENV, "")
    assert shm_dir() == "/dev/shm"


def test_reserve_raises_enospc_with_sizes(full_shm, shm_prefix):
    name = f"{shm_prefix}-big"
    with GuestRam.create(name, 16 * MiB) as ram:     # sparse: creating it costs only the header
        assert os.path.dirname(ram.path) == full_shm
        header = ram_offset_for(ram.npages)
        assert os.fstat(ram.fd).st_blocks * 512 == header
        with pytest.raises(SegmentError) as ei:
            ram.reserve()
        assert ei.value.errno == errno.ENOSPC
        assert re.search(rf"needs 16\.0 MiB in {re.escape(full_shm)}, [0-9.]+ MiB free", str(ei.value)), \
            str(ei.value)
        assert os.fstat(ram.fd).st_blocks * 512 == header  # the failed call gave its pages back
        with pytest.raises(SegmentError) as ei:
            ram.prefault([(0, 256), (1024, 2048)])           # 9 MiB of 16
        assert ei.value.errno == errno.ENOSPC and "needs 9.0 MiB" in str(ei.value)
        ram.reserve([(0, 256)])                              # 1 MiB fits
        assert os.fstat(ram.fd).st_blocks * 512 == header + MiB
        ram.prefault([(0, 256)])
        ram.ram[:MiB] = b"\1" * MiB                          # reserved: safe to write
        ram.unlink()
    assert list_segments(shm_prefix) == []


PREFAULT_CHILD = r"""
import errno, sys
from memstore import segment
from memstore.errors import SegmentError
if sys.argv[2] == "fallback":
    def no_populate(mm, start, length):
        raise OSError(errno.EINVAL, "no MADV_POPULATE_WRITE")
    segment._populate_write = no_populate
ram = segment.GuestRam.create(sys.argv[1], 16 << 20)
try:
    ram.prefault(None if sys.argv[3] == "all" else [(0, 4096)])
except SegmentError as exc:
    print("refused", errno.errorcode[exc.errno], exc)
else:
    print("prefaulted")
finally:
    ram.close()
    ram.unlink()
"""


@pytest.mark.parametrize("mode", ["madvise", "fallback"])
@pytest.mark.parametrize("runs", ["all", "runs"])
def test_prefault_of_a_full_shm_is_an_error_not_sigbus(full_shm, shm_prefix, mode, runs):
    """In a child process, so that a regression kills the child, not pytest."""
    res = subprocess.run([sys.executable, "-c", PREFAULT_CHILD, f"{shm_prefix}-pf", mode, runs],
                         capture_output=True, text=True, timeout=30,
                         env={**os.environ, SHM_DIR_ENV: full_shm})
    assert res.returncode == 0, f"child died (signal {-res.returncode})" if res.returncode < 0 \
        else res.stderr
    assert res.stdout.startswith("refused ENOSPC"), res.stdout + res.stderr
    assert "needs 16.0 MiB" in res.stdout
    assert os.listdir(full_shm) == []


def test_disk_map_of_a_full_shm_is_enospc(full_shm, shm_prefix, tmp_path):
    with pytest.raises(SegmentError) as ei:
        DiskMap.create(f"{shm_prefix}-vm", 0, str(tmp_path / "x.img"), 1 << 40)   # a 16 MiB map
    assert ei.value.errno == errno.ENOSPC
    assert os.listdir(full_shm) == []                # removed again


def test_guest_runs_in_the_configured_shm_dir(full_shm, shm_prefix):
    """launch_guest passes LIVEMIG_SHM_DIR on: the guest attaches the segment there."""
    name = f"{shm_prefix}-g"
    ram = GuestRam.create(name, MiB)
    proc = None
    try:
        ram.prefault()
        ram.ctl.workload = "uniform:rate=20000"
        proc = launch_guest(name)
        wait_for(lambda: ram.ctl.writes >= 1000 or proc.poll() is not None, what="guest writes")
        assert proc.poll() is None
        command(ram, Cmd.STOP)
        assert proc.wait(WAIT_S) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
        ram.close()
        ram.unlink()
