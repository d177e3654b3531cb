"""Raw-TCP baseline: the plain-socket ceiling the benchmark compares against.

Moves ``nbytes`` (1 GiB by default) of incompressible bytes from one
/dev/shm-backed mmap buffer into another over ONE loopback TCP connection
(127.0.0.1 only), with the best plain-Python method the limits bench found
(``../shared/bench/limits/RESULTS.md``: 38 Gbit/s = 4.4-4.5 GiB/s):

    sender process:   sock.sendall(memoryview(src)[o:o + 1 MiB])  for every 1 MiB slice
    receiver process: sock.recv_into(memoryview(dst)[got:])      straight into the buffer

Sender and receiver are two forked processes (as the source and destination
agents are). Before the clock starts, the receiver pre-faults its buffer
(MADV_POPULATE_WRITE, as the agent's destination does in setup) and the
sender pre-reads its range; the clock is the sender's start -> the
receiver's last byte (``time.perf_counter`` = CLOCK_MONOTONIC, shared by
all processes). Every run is verified (xxh3-64 of destination == source;
the destination is zeroed before each run). Result: the median of N runs.

The two buffers are ``/dev/shm/<prefix>-tcp-src`` and ``-tcp-dst`` (the
caller's unique prefix) and are unlinked in ``finally``. Children are
tracked by PID and killed if they outlive a run.

``python -m agent.bench.rawtcp [--mib N] [--runs N]`` runs it alone.
"""
from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import secrets
import socket
import statistics
import sys
import time

import xxhash

GiB = 1 << 30
MiB = 1 << 20
PAGE = 4096
CHUNK = 1 * MiB
HOST = "127.0.0.1"
RUN_TIMEOUT_S = 60.0
MADV_POPULATE_READ = 22     # Linux >= 5.14; not exported by the mmap module in 3.11
MADV_POPULATE_WRITE = 23
SHM_DIR = "/dev/shm"
METHOD = "blocking sendall(1 MiB memoryview) -> recv_into(shm), 1 TCP connection, 127.0.0.1, 2 processes"


# ---------------------------------------------------------------------------- buffers
class ShmBuffer:
    """A /dev/shm file of ``size`` bytes, mapped read-write."""

    def __init__(self, name: str, size: int, create: bool) -> None:
        self.name = name
        self.path = os.path.join(SHM_DIR, name)
        self.size = size
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:      # a view still pins it; the process is about to exit anyway
            pass

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def populate(mm: mmap.mmap, nbytes: int, write: bool) -> None:
    """Make the first ``nbytes`` resident (and writable) in this mapping, without page faults later."""
    try:
        mm.madvise(MADV_POPULATE_WRITE if write else MADV_POPULATE_READ, 0, nbytes)
        return
    except (OSError, ValueError):
        pass
    view = memoryview(mm)[:nbytes]
    touched = view[::PAGE]
    try:
        if write:
            touched[:] = touched.tobytes()   # rewrite one byte per page with its own value
        else:
            touched.tobytes()
    finally:
        touched.release()
        view.release()


def fill_random(mm: mmap.mmap, nbytes: int, chunk: int = 4 * MiB) -> None:
    """Incompressible bytes, as the benchmark's ``prefill=random`` VMs hold."""
    view = memoryview(mm)
    try:
        for off in range(0, nbytes, chunk):
            n = min(chunk, nbytes - off)
            view[off:off + n] = os.urandom(n)
    finally:
        view.release()


def zero(mm: mmap.mmap, nbytes: int, chunk: int = 16 * MiB) -> None:
    zeros = bytes(chunk)
    view = memoryview(mm)
    try:
        for off in range(0, nbytes, chunk):
            n = min(chunk, nbytes - off)
            view[off:off + n] = zeros[:n]
    finally:
        view.release()


def digest(mm: mmap.mmap, nbytes: int) -> int:
    view = memoryview(mm)[:nbytes]
    try:
        return xxhash.xxh3_64_intdigest(view)
    finally:
        view.release()


# ---------------------------------------------------------------------------- the two processes
def _receiver(dst_name: str, size: int, nbytes: int, out) -> None:
    try:
        buf = ShmBuffer(dst_name, size, create=False)
        populate(buf.mm, nbytes, write=True)          # as the destination agent does in setup
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.bind((HOST, 0))
        ls.listen(1)
        ls.settimeout(RUN_TIMEOUT_S)
        out.send(("listening", ls.getsockname()[1]))
        c, _ = ls.accept()
        # Plain blocking socket for the transfer: a timeout makes Python poll()
        # before every recv, which costs the baseline ~10%. The parent bounds
        # the run with its own deadline and kills a stuck child.
        c.settimeout(None)
        view = memoryview(buf.mm)[:nbytes]
        got = 0
        c0 = time.process_time()
        while got < nbytes:
            k = c.recv_into(view[got:])
            if not k:
                break
            got += k
        t1 = time.perf_counter()
        cpu = time.process_time() - c0
        view.release()
        c.close()
        ls.close()
        buf.close()
        out.send(("received", got, t1, cpu))
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        out.send(("error", f"receiver: {exc!r}"))


def _sender(src_name: str, size: int, nbytes: int, port: int, go, out) -> None:
    try:
        buf = ShmBuffer(src_name, size, create=False)
        populate(buf.mm, nbytes, write=False)
        s = socket.create_connection((HOST, port), timeout=RUN_TIMEOUT_S)
        s.settimeout(None)                            # blocking: see the receiver
        out.send(("connected",))
        if not go.wait(RUN_TIMEOUT_S):
            raise TimeoutError("no go signal")
        mv = memoryview(buf.mm)
        c0 = time.process_time()
        t0 = time.perf_counter()
        for off in range(0, nbytes, CHUNK):
            s.sendall(mv[off:min(off + CHUNK, nbytes)])
        cpu = time.process_time() - c0
        s.shutdown(socket.SHUT_WR)
        mv.release()
        s.close()
        buf.close()
        out.send(("sent", t0, cpu))
    except BaseException as exc:  # noqa: BLE001
        out.send(("error", f"sender: {exc!r}"))


def _expect(conn, kind: str, deadline: float) -> tuple:
    left = max(0.0, deadline - time.monotonic())
    if not conn.poll(left):
        raise TimeoutError(f"raw TCP baseline: no {kind!r} within {RUN_TIMEOUT_S} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"raw TCP baseline: {msg[1]}")
    if msg[0] != kind:
        raise RuntimeError(f"raw TCP baseline: expected {kind!r}, got {msg!r}")
    return msg


def _one_run(src: ShmBuffer, dst: ShmBuffer, nbytes: int, src_digest: int) -> dict:
    ctx = mp.get_context("fork")
    zero(dst.mm, nbytes)
    procs: list = []
    deadline = time.monotonic() + RUN_TIMEOUT_S + 10.0
    r_recv, r_send = ctx.Pipe(duplex=False)
    s_recv, s_send = ctx.Pipe(duplex=False)
    go = ctx.Event()
    try:
        rp = ctx.Process(target=_receiver, args=(dst.name, dst.size, nbytes, r_send), daemon=True)
        rp.start()
        procs.append(rp)
        port = _expect(r_recv, "listening", deadline)[1]
        sp = ctx.Process(target=_sender, args=(src.name, src.size, nbytes, port, go, s_send), daemon=True)
        sp.start()
        procs.append(sp)
        _expect(s_recv, "connected", deadline)
        go.set()
        _, t0, send_cpu = _expect(s_recv, "sent", deadline)
        _, got, t1, recv_cpu = _expect(r_recv, "received", deadline)
        for p in procs:
            p.join(timeout=5)
    finally:
        for p in procs:                  # by PID, never by name
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for c in (r_recv, r_send, s_recv, s_send):
            c.close()
    seconds = t1 - t0
    ok = got == nbytes and digest(dst.mm, nbytes) == src_digest
    return {"seconds": seconds, "bytes": got, "gibps": got / seconds / GiB if seconds > 0 else 0.0,
            "verified": ok, "send_cpu_pct": round(100.0 * send_cpu / seconds, 1),
            "recv_cpu_pct": round(100.0 * recv_cpu / seconds, 1)}


def measure(nbytes: int = GiB, runs: int = 3, *, prefix: str | None = None, log=None) -> dict:
    """Median of ``runs`` raw-TCP transfers of ``nbytes``; see the module doc."""
    if runs < 1:
        raise ValueError("runs >= 1")
    if nbytes < PAGE or nbytes % PAGE:
        raise ValueError("nbytes: a positive multiple of 4096")
    prefix = prefix or f"livemig-rawtcp-{os.getpid()}-{secrets.token_hex(3)}"
    src = dst = None
    rows: list[dict] = []
    try:
        src = ShmBuffer(f"{prefix}-tcp-src", nbytes, create=True)
        dst = ShmBuffer(f"{prefix}-tcp-dst", nbytes, create=True)
        fill_random(src.mm, nbytes)
        populate(dst.mm, nbytes, write=True)
        src_digest = digest(src.mm, nbytes)
        for i in range(runs):
            row = _one_run(src, dst, nbytes, src_digest)
            rows.append(row)
            if log is not None:
                log(f"raw TCP run {i + 1}/{runs}: {row['gibps']:.2f} GiB/s ({row['seconds'] * 1000:.0f} ms, "
                    f"verified={row['verified']})")
    finally:
        for b in (src, dst):
            if b is not None:
                b.close()
                b.unlink()
    g = [r["gibps"] for r in rows]
    med = statistics.median(g)
    return {
        "method": METHOD,
        "bytes": nbytes,
        "chunk_bytes": CHUNK,
        "runs": len(rows),
        "gibps": {"median": round(med, 4), "min": round(min(g), 4), "max": round(max(g), 4)},
        "gbit_s_median": round(med * GiB * 8 / 1e9, 2),
        "seconds": [round(r["seconds"], 6) for r in rows],
        "verified": all(r["verified"] for r in rows),
        "send_cpu_pct": statistics.median(r["send_cpu_pct"] for r in rows),
        "recv_cpu_pct": statistics.median(r["recv_cpu_pct"] for r in rows),
        "per_run": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.bench.rawtcp", description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=1024, help="bytes per transfer, MiB (default 1024)")
    p.add_argument("--runs", type=int, default=5)
    ns = p.parse_args(argv)
    r = measure(ns.mib * MiB, ns.runs, log=lambda m: print(m, file=sys.stderr))
    g = r["gibps"]
    print(f"raw TCP {ns.mib} MiB, {r['runs']} runs: {g['median']:.2f} GiB/s [{g['min']:.2f}-{g['max']:.2f}] "
          f"= {r['gbit_s_median']} Gbit/s, verified={r['verified']}, cpu send/recv "
          f"{r['send_cpu_pct']:.0f}%/{r['recv_cpu_pct']:.0f}%")
    return 0 if r["verified"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
