"""The storage benchmark: a live storage move against ``cp --sparse=always``.

    python -m agent.bench.storage_bench [--quick] [--json] [--io N] [--size SIZE] [--keep-cache]

One run: a fresh agent (no TLS: nothing crosses a network) in a work dir on
the data dir's filesystem (``--workdir``, default the system temp dir), a
disk image of ``--size`` (1 GiB; ``--quick`` 256 MiB) that is half data and
half holes (1 MiB of data, 1 MiB of hole, ...), attached to a VM whose guest
writes it (``idle:io=2000``: 2000 block writes/s of 64 KiB, anywhere on the
disk), and a target on another filesystem: a tmpfs the bench mounts (root),
else a fresh directory in /dev/shm. In the same run, first:

1. the baseline: ``cp --sparse=always`` of the image into the target, twice,
   timed (the best counts), before the VM exists (cp cannot follow a
   guest's writes); the copies are removed;
2. the move: ``storage move VM --dest TARGET --wait`` with the guest
   writing throughout.

Before each, the image is fdatasynced and its page cache dropped
(POSIX_FADV_DONTNEED on that file only), so both read it from the device
(``--keep-cache``: both read it from the page cache).

Figures: cp and move throughput over the image's allocated bytes (the move's
over its whole wall time, and its bulk pass alone), allocation after vs
before plus what the guest wrote meanwhile, the guest's disk write wait
(p99, max) while the copier ran, and the disk IO pause at the switch.
Exit 0 when the move completed verified and nothing was left behind.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from agent.control.proc import AgentProcess, wait_for

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 64 << 10


def parse_size(text: str) -> int:
    from memstore import parse_size as ps

    return ps(text)


def make_image(path: str, size: int) -> int:
    """Half data, half holes, in 1 MiB stripes; returns the data bytes written."""
    from memstore import DiskImage

    pattern = bytearray(os.urandom(MiB))
    written = 0
    with DiskImage.create(path, size) as img:
        for i, off in enumerate(range(0, size, 2 * MiB)):
            pattern[:8] = i.to_bytes(8, "little")           # every stripe differs
            img.write_blocks(off // BLOCK, pattern)
            written += MiB
        img.fdatasync()
    return written


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


class Target:
    """Another filesystem for the copies: a tmpfs mounted here (root), else a /dev/shm directory."""

    def __init__(self, workdir: str, size: int) -> None:
        self.path = os.path.join(workdir, "target")
        os.makedirs(self.path)
        self.mounted = False
        if os.geteuid() == 0:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={2 * size + 256 * MiB},mode=0700", "tmpfs",
                                self.path], capture_output=True, text=True)
            self.mounted = r.returncode == 0
        if not self.mounted:
            os.rmdir(self.path)
            self.path = tempfile.mkdtemp(prefix="livemig-storage-bench-", dir="/dev/shm")
        self.kind = "tmpfs (mounted by the bench)" if self.mounted else "/dev/shm directory"

    def close(self) -> None:
        if self.mounted:
            r = subprocess.run(["umount", self.path], capture_output=True)
            if r.returncode:
                subprocess.run(["umount", "-l", self.path], capture_output=True)
            os.rmdir(self.path)
        else:
            shutil.rmtree(self.path, ignore_errors=True)


def run(size: int, io: int, keep_cache: bool, workdir_base: str, log) -> dict:
    work = tempfile.mkdtemp(prefix="livemig-storage-bench-", dir=workdir_base)
    agent = target = None
    out: dict = {"ok": False}
    try:
        target = Target(work, size)
        image = os.path.join(work, "disk.img")
        log(f"image: {size // MiB} MiB, half data, in {work} ({_fstype(work)}); target {target.path} ({target.kind})")
        data = make_image(image, size)
        alloc0 = allocated(image)
        out.update(size_bytes=size, data_bytes=data, allocated_before=alloc0, source_fs=_fstype(work),
                   target_fs=_fstype(target.path), target=target.kind, page_cache="kept" if keep_cache else "dropped",
                   guest_io_wps=io)

        # 1. the baseline, twice (the faster run counts: the first may pay to warm caches below ours)
        dst = os.path.join(target.path, "cp.img")
        cp_runs = []
        for _ in range(2):
            if not keep_cache:
                drop_cache(image)
            t0 = time.perf_counter()
            subprocess.run(["cp", "--sparse=always", image, dst], check=True)
            cp_runs.append(time.perf_counter() - t0)
            out["cp_allocated"] = allocated(dst)
            os.unlink(dst)
        cp_s = min(cp_runs)
        out.update(cp_s=round(cp_s, 3), cp_runs_s=[round(x, 3) for x in cp_runs],
                   cp_mibps=round(alloc0 / cp_s / MiB, 1))
        log(f"cp --sparse=always: {', '.join(f'{x:.2f}' for x in cp_runs)} s, best {alloc0 / cp_s / MiB:.0f} MiB/s")

        # 2. the move, the guest writing
        agent = AgentProcess("bench", work, shm_prefix=f"lmsb{os.getpid()}", insecure=True).start()
        agent.call("vm.create", name="vm1", memory="16M", workload=f"idle:io={io}",
                   attach=[{"name": "disk", "path": image}])
        wait_for(lambda: agent.call("vm.show", name="vm1")["io_rate_wps"] > 0, 20, what="the guest's disk writes")
        if not keep_cache:
            drop_cache(image)
        w0 = agent.call("vm.show", name="vm1")["io_writes"]
        t0 = time.perf_counter()
        rep = agent.call("storage.move", vm="vm1", dest=target.path, wait=True, timeout_s=600)
        move_s = time.perf_counter() - t0
        w1 = agent.call("vm.show", name="vm1")["io_writes"]
        disk = rep["disks"][0]
        bulk = [r for r in rep["round_log"] if r["kind"] == "bulk"]
        bulk_bytes, bulk_ms = sum(r["bytes"] for r in bulk), sum(r["ms"] for r in bulk)
        ww = rep["guest_write_wait_mirroring"]
        out.update(
            status=rep["status"], verified=rep["verified"], error=rep["error"], method=disk["method"],
            move_s=round(move_s, 3), move_mibps=round(alloc0 / move_s / MiB, 1),
            bulk_mibps=round(bulk_bytes / (bulk_ms / 1000) / MiB, 1) if bulk_ms else None,
            move_vs_cp=round(cp_s / move_s, 2),
            bytes_copied=rep["bytes_copied"], passes=rep["rounds"], held_windows=rep["held_windows"],
            guest_writes_during=w1 - w0, written_bytes=(w1 - w0) * BLOCK,
            allocated_after=disk["allocated_after"],
            allocated_after_vs_before_plus_written=round(
                disk["allocated_after"] / (disk["allocated_before"] + (w1 - w0) * BLOCK), 3),
            guest_write_wait_p99_ms=ww["p99_ms"], guest_write_wait_max_ms=ww["max_ms"],
            guest_write_wait_samples=ww["samples"], guest_io_rate_during_wps=rep["guest_io_rate_during_wps"],
            io_pause_ms=rep["io_pause_ms"], switch_ms=rep["switch_ms"], phases_ms=rep["phases"],
            final_round_blocks=next((r["blocks"] for r in rep["round_log"] if r["kind"] == "final"), None))
        log(f"move: {move_s:.2f} s, {out['move_mibps']:.0f} MiB/s, io pause {rep['io_pause_ms']:.1f} ms, "
            f"{rep['status']}")
        agent.call("vm.delete", name="vm1")
        for p in (image, os.path.join(target.path, "disk.img")):
            if os.path.exists(p):
                os.unlink(p)
        out["ok"] = rep["status"] == "completed" and rep["verified"] is True
    finally:
        if agent is not None:
            agent.stop()
        if target is not None:
            target.close()
        shutil.rmtree(work, ignore_errors=True)
    return out


def _fstype(path: str) -> str:
    best, fstype = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, parts[2]
    return fstype


def format_table(r: dict) -> str:
    if "move_s" not in r:
        return f"storage bench failed: {r.get('error')}"
    rows = [
        ("disk", f"{r['size_bytes'] // MiB} MiB, {r['data_bytes'] // MiB} MiB data ({r['source_fs']} -> "
                 f"{r['target_fs']}, page cache {r['page_cache']})"),
        ("cp --sparse=always", f"{r['cp_s']:.2f} s  {r['cp_mibps']:.0f} MiB/s (best of {len(r['cp_runs_s'])}; "
                               f"no guest: cp cannot follow writes)"),
        ("storage move", f"{r['move_s']:.2f} s  {r['move_mibps']:.0f} MiB/s overall, bulk pass "
                         f"{r['bulk_mibps']} MiB/s; {r['move_vs_cp']:.2f}x cp's speed; {r['status']}, "
                         f"verified {r['verified']}"),
        ("guest writes", f"{r['guest_io_wps']}/s asked, {r['guest_io_rate_during_wps']}/s done; "
                         f"{r['guest_writes_during']} during the move"),
        ("allocation", f"{r['allocated_before'] // MiB} MiB before, {r['allocated_after'] // MiB} MiB after "
                       f"(= {r['allocated_after_vs_before_plus_written']:.3f} x before + written)"),
        ("write wait", f"p99 {r['guest_write_wait_p99_ms']} ms, max {r['guest_write_wait_max_ms']} ms "
                       f"while mirroring ({r['guest_write_wait_samples']} samples)"),
        ("io pause", f"{r['io_pause_ms']:.2f} ms at the switch ({r['final_round_blocks']} blocks in the final round; "
                     + ", ".join(f"{k} {v}" for k, v in r["switch_ms"].items()) + ")"),
    ]
    return "\n".join(f"{k:<20} {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.bench.storage_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 256 MiB disk instead of 1 GiB")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--size", type=parse_size, help="disk size (overrides --quick; e.g. 2G)")
    p.add_argument("--io", type=int, default=2000, help="guest disk writes/s during the move (default 2000)")
    p.add_argument("--keep-cache", action="store_true", help="do not drop the image's page cache before cp and move")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="where the image lives (its filesystem is the source; default the temp dir)")
    ns = p.parse_args(argv)
    size = ns.size or (256 * MiB if ns.quick else GiB)

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} storage-bench: {msg}", file=sys.stderr, flush=True)

    try:
        r = run(size, ns.io, ns.keep_cache, ns.workdir, log)
    except Exception as exc:          # noqa: BLE001 - a figure run: report and fail
        r = {"ok": False, "error": repr(exc)}
    print(json.dumps(r, indent=1) if ns.json else format_table(r))
    return 0 if r.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
