"""Raw-TCP baselines: the plain-socket ceilings the benchmark compares against.

Moves ``nbytes`` (1 GiB by default) of incompressible bytes from one
/dev/shm-backed mmap buffer into another over loopback TCP (127.0.0.1 only),
with the best plain-Python method the limits bench found
(``../shared/bench/limits/RESULTS.md``: 38 Gbit/s = 4.4-4.5 GiB/s). Three
things can vary (a :class:`Mode`); the default is the original baseline:

* **pre-faulted, 1 connection** (default): before the clock starts the
  receiver pre-faults its buffer (MADV_POPULATE_WRITE, as the agent's
  destination does in setup); the destination is zeroed before each run.

      sender process:   sock.sendall(memoryview(src)[o:o + 1 MiB])  for every 1 MiB slice
      receiver process: sock.recv_into(memoryview(dst)[got:])      straight into the buffer

* **fresh** (``fresh=True``, "end to end"): the receiver writes into a NEW
  /dev/shm file created (ftruncate) for that run, never pre-faulted nor
  zeroed, so the kernel allocates every page inside ``recv_into``: what a
  migration pays when nobody pre-faults. The file is unlinked after the run.

* **N connections** (``connections=N``, 2..8): N TCP connections, each with a
  sender THREAD (in the one sender process) and a receiver THREAD (in the one
  receiver process), the way the agent's data streams work (blocking
  ``sendall``/``recv_into`` release the GIL). The bytes are cut into 4 MiB
  chunks; chunk i goes over connection i % N (:func:`split_chunks`), each
  connection carries its chunks in order, every chunk behind a 16-byte header
  (offset, length), and the receiver ``recv_into``'s it at its place. With
  ``connections=1`` the single-connection method above runs (no headers).

Sender and receiver are two forked processes (as the source and destination
agents are). The sender pre-reads its range before the clock starts; the
clock is the first byte of any sender -> the last byte of the last receiver
(``time.perf_counter`` = CLOCK_MONOTONIC, shared by all processes). Every run
is verified: xxh3-64 of destination == source (and, with N connections, the
received chunks tile the buffer exactly once). Result: the median of N runs,
with the mode in ``mode``/``method``.

The buffers are ``/dev/shm/<prefix>-tcp-src``, ``-tcp-dst`` (pre-faulted) and
``-tcp-fresh<i>`` (one per fresh run), under the caller's unique prefix, and
are unlinked in ``finally``. Children are tracked by PID and killed if they
outlive a run.

``python -m agent.bench.rawtcp [--mib N] [--runs N] [--fresh] [--connections N]`` runs it alone.
"""
from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import secrets
import socket
import statistics
import struct
import sys
import threading
import time
from dataclasses import dataclass

import xxhash

GiB = 1 << 30
MiB = 1 << 20
PAGE = 4096
CHUNK = 1 * MiB                 # single connection: the size of one sendall
STREAM_CHUNK = 4 * MiB          # N connections: chunk i goes over connection i % N
MAX_CONNECTIONS = 8
HEADER = struct.Struct("!QQ")   # N connections: (offset, length) before every chunk
HOST = "127.0.0.1"
RUN_TIMEOUT_S = 60.0
MADV_POPULATE_READ = 22     # Linux >= 5.14; not exported by the mmap module in 3.11
MADV_POPULATE_WRITE = 23
SHM_DIR = "/dev/shm"
METHOD = "blocking sendall(1 MiB memoryview) -> recv_into(shm), 1 TCP connection, 127.0.0.1, 2 processes"


@dataclass(frozen=True)
class Mode:
    """One way of running the baseline: the destination's memory and the number of connections."""
    fresh: bool = False          # True: a new, never-touched shm file per run (pages allocated in recv_into)
    connections: int = 1         # 1: the original method; 2..8: one thread per connection on each side

    def __post_init__(self) -> None:
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections: 1..{MAX_CONNECTIONS}")

    @property
    def name(self) -> str:
        """``prefaulted-1conn``, ``fresh-1conn``, ``fresh-2conn``, ..."""
        return f"{'fresh' if self.fresh else 'prefaulted'}-{self.connections}conn"

    @property
    def label(self) -> str:
        n = self.connections
        return f"{'fresh' if self.fresh else 'pre-faulted'} destination, {n} connection{'s' if n > 1 else ''}"

    @property
    def method(self) -> str:
        if not self.fresh and self.connections == 1:
            return METHOD
        dst = ("recv_into(fresh shm file per run, never pre-faulted: pages allocated in recv_into)"
               if self.fresh else "recv_into(pre-faulted shm)")
        if self.connections == 1:
            return f"blocking sendall(1 MiB memoryview) -> {dst}, 1 TCP connection, 127.0.0.1, 2 processes"
        return (f"blocking sendall(16 B header + 4 MiB chunk, chunk i on connection i % {self.connections}) -> "
                f"{dst} at the chunk's offset, {self.connections} TCP connections, one thread per connection "
                f"in each of 2 processes, 127.0.0.1")


DEFAULT_MODE = Mode()


def split_chunks(nbytes: int, connections: int, chunk: int = STREAM_CHUNK) -> list[list[tuple[int, int]]]:
    """The (offset, length) chunks each connection carries, in order: chunk i goes over connection i % N."""
    if nbytes < 0 or connections < 1 or chunk < 1:
        raise ValueError("split_chunks: nbytes >= 0, connections >= 1, chunk >= 1")
    out: list[list[tuple[int, int]]] = [[] for _ in range(connections)]
    for i, off in enumerate(range(0, nbytes, chunk)):
        out[i % connections].append((off, min(chunk, nbytes - off)))
    return out


def tiles(chunks, nbytes: int) -> bool:
    """True when the (offset, length) pairs cover [0, nbytes) exactly once."""
    pos = 0
    for off, n in sorted(chunks):
        if off != pos or n <= 0:
            return False
        pos += n
    return pos == nbytes


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


# ---------------------------------------------------------------------------- N connections: the threads
def _recv_exact(c: socket.socket, view: memoryview) -> int:
    """Fill ``view`` from ``c``; returns the bytes got (fewer only at EOF)."""
    got, n = 0, len(view)
    while got < n:
        k = c.recv_into(view[got:])
        if not k:
            break
        got += k
    return got


def _recv_stream(c: socket.socket, view: memoryview, nbytes: int, out: dict) -> None:
    """One receiver thread: (header, chunk)* until EOF; records the chunks and the time of its last byte."""
    hdr = bytearray(HEADER.size)
    hv = memoryview(hdr)
    chunks = out["chunks"]
    try:
        while True:
            k = _recv_exact(c, hv)
            if k == 0:
                break                            # EOF between chunks: this connection is done
            if k < HEADER.size:
                raise ConnectionError(f"EOF inside a chunk header ({k} of {HEADER.size} bytes)")
            off, n = HEADER.unpack(hdr)
            if n <= 0 or off + n > nbytes:
                raise ValueError(f"chunk ({off}, {n}) outside the {nbytes}-byte buffer")
            k = _recv_exact(c, view[off:off + n])
            out["bytes"] += k
            if k < n:
                raise ConnectionError(f"EOF inside chunk ({off}, {n}) after {k} bytes")
            out["t_last"] = time.perf_counter()
            chunks.append((off, n))
    except BaseException as exc:  # noqa: BLE001 - reported by the receiver process
        out["error"] = repr(exc)
    finally:
        hv.release()


def _send_stream(s: socket.socket, mv: memoryview, chunks: list[tuple[int, int]], start: threading.Event,
                 out: dict) -> None:
    """One sender thread: waits for the start, then header + chunk for each of its chunks, then SHUT_WR."""
    try:
        start.wait()
        out["t0"] = time.perf_counter()
        for off, n in chunks:
            s.sendall(HEADER.pack(off, n))
            s.sendall(mv[off:off + n])
        s.shutdown(socket.SHUT_WR)
    except BaseException as exc:  # noqa: BLE001 - reported by the sender process
        out["error"] = repr(exc)


# ---------------------------------------------------------------------------- the two processes
def _receiver(dst_name: str, size: int, nbytes: int, prefault: bool, connections: int, out) -> None:
    try:
        buf = ShmBuffer(dst_name, size, create=False)
        if prefault:
            populate(buf.mm, nbytes, write=True)      # as the destination agent does in setup
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.bind((HOST, 0))
        ls.listen(connections)
        ls.settimeout(RUN_TIMEOUT_S)
        out.send(("listening", ls.getsockname()[1]))
        conns = []
        for _ in range(connections):
            c, _ = ls.accept()
            # Plain blocking socket for the transfer: a timeout makes Python poll()
            # before every recv, which costs the baseline ~10%. The parent bounds
            # the run with its own deadline and kills a stuck child.
            c.settimeout(None)
            conns.append(c)
        view = memoryview(buf.mm)[:nbytes]
        c0 = time.process_time()
        if connections == 1:
            c = conns[0]
            got = 0
            while got < nbytes:
                k = c.recv_into(view[got:])
                if not k:
                    break
                got += k
            t1 = time.perf_counter()
            tiled = got == nbytes
        else:
            outs = [{"chunks": [], "bytes": 0, "t_last": None, "error": None} for _ in conns]
            threads = [threading.Thread(target=_recv_stream, args=(c, view, nbytes, o), daemon=True)
                       for c, o in zip(conns, outs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()                 # the parent's deadline bounds a stuck thread (it kills us)
            errors = [o["error"] for o in outs if o["error"]]
            if errors:
                raise RuntimeError("; ".join(errors))
            got = sum(o["bytes"] for o in outs)
            t1 = max((o["t_last"] for o in outs if o["t_last"] is not None), default=time.perf_counter())
            tiled = tiles([ch for o in outs for ch in o["chunks"]], nbytes)
        cpu = time.process_time() - c0
        view.release()
        for c in conns:
            c.close()
        ls.close()
        buf.close()
        out.send(("received", got, t1, cpu, tiled))
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        out.send(("error", f"receiver: {exc!r}"))


def _sender(src_name: str, size: int, nbytes: int, port: int, connections: int, go, out) -> None:
    try:
        buf = ShmBuffer(src_name, size, create=False)
        populate(buf.mm, nbytes, write=False)
        socks = []
        for _ in range(connections):
            s = socket.create_connection((HOST, port), timeout=RUN_TIMEOUT_S)
            s.settimeout(None)                        # blocking: see the receiver
            socks.append(s)
        mv = memoryview(buf.mm)
        start = threading.Event()
        outs: list[dict] = []
        threads = []
        if connections > 1:                           # ready before the go, started by one event
            for s, chunks in zip(socks, split_chunks(nbytes, connections)):
                o = {"t0": None, "error": None}
                outs.append(o)
                threads.append(threading.Thread(target=_send_stream, args=(s, mv, chunks, start, o), daemon=True))
            for t in threads:
                t.start()
        out.send(("connected",))
        if not go.wait(RUN_TIMEOUT_S):
            raise TimeoutError("no go signal")
        c0 = time.process_time()
        if connections == 1:
            s = socks[0]
            t0 = time.perf_counter()
            for off in range(0, nbytes, CHUNK):
                s.sendall(mv[off:min(off + CHUNK, nbytes)])
            s.shutdown(socket.SHUT_WR)
        else:
            start.set()
            for t in threads:
                t.join()
            errors = [o["error"] for o in outs if o["error"]]
            if errors:
                raise RuntimeError("; ".join(errors))
            t0 = min(o["t0"] for o in outs)
        cpu = time.process_time() - c0
        mv.release()
        for s in socks:
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


def _one_run(src: ShmBuffer, dst: ShmBuffer, nbytes: int, src_digest: int, mode: Mode = DEFAULT_MODE) -> dict:
    """One transfer into ``dst``: pre-faulted (zeroed here) unless ``mode.fresh`` (then a never-touched file)."""
    ctx = mp.get_context("fork")
    if not mode.fresh:
        zero(dst.mm, nbytes)
    procs: list = []
    deadline = time.monotonic() + RUN_TIMEOUT_S + 10.0
    r_recv, r_send = ctx.Pipe(duplex=False)
    s_recv, s_send = ctx.Pipe(duplex=False)
    go = ctx.Event()
    n = mode.connections
    try:
        rp = ctx.Process(target=_receiver, args=(dst.name, dst.size, nbytes, not mode.fresh, n, r_send),
                         daemon=True)
        rp.start()
        procs.append(rp)
        port = _expect(r_recv, "listening", deadline)[1]
        sp = ctx.Process(target=_sender, args=(src.name, src.size, nbytes, port, n, go, s_send), daemon=True)
        sp.start()
        procs.append(sp)
        _expect(s_recv, "connected", deadline)
        go.set()
        _, t0, send_cpu = _expect(s_recv, "sent", deadline)
        _, got, t1, recv_cpu, tiled = _expect(r_recv, "received", deadline)
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
    ok = got == nbytes and tiled and digest(dst.mm, nbytes) == src_digest
    return {"seconds": seconds, "bytes": got, "gibps": got / seconds / GiB if seconds > 0 else 0.0,
            "verified": ok, "send_cpu_pct": round(100.0 * send_cpu / seconds, 1),
            "recv_cpu_pct": round(100.0 * recv_cpu / seconds, 1)}


def _fresh_run(src: ShmBuffer, name: str, nbytes: int, src_digest: int, mode: Mode) -> dict:
    """A run into a new /dev/shm file (ftruncate only: no page exists before recv_into), unlinked after."""
    dst = ShmBuffer(name, nbytes, create=True)
    try:
        return _one_run(src, dst, nbytes, src_digest, mode)
    finally:
        dst.close()
        dst.unlink()


def _summary(mode: Mode, nbytes: int, rows: list[dict]) -> dict:
    g = [r["gibps"] for r in rows]
    ms = [r["seconds"] * 1000.0 for r in rows]
    med = statistics.median(g)
    return {
        "mode": mode.name,
        "label": mode.label,
        "fresh": mode.fresh,
        "connections": mode.connections,
        "method": mode.method,
        "bytes": nbytes,
        "chunk_bytes": CHUNK if mode.connections == 1 else STREAM_CHUNK,
        "runs": len(rows),
        "gibps": {"median": round(med, 4), "min": round(min(g), 4), "max": round(max(g), 4)},
        "ms": {"median": round(statistics.median(ms), 1), "min": round(min(ms), 1), "max": round(max(ms), 1)},
        "gbit_s_median": round(med * GiB * 8 / 1e9, 2),
        "seconds": [round(r["seconds"], 6) for r in rows],
        "verified": all(r["verified"] for r in rows),
        "send_cpu_pct": statistics.median(r["send_cpu_pct"] for r in rows),
        "recv_cpu_pct": statistics.median(r["recv_cpu_pct"] for r in rows),
        "per_run": rows,
    }


def measure_modes(nbytes: int, modes: dict[str, Mode], runs: int = 1, *, prefix: str | None = None,
                  log=None) -> dict[str, dict]:
    """``runs`` transfers of ``nbytes`` in each mode, in the order given, from one source buffer.

    Returns ``{key: result}`` with one result document per mode (see :func:`measure`).
    """
    if runs < 1:
        raise ValueError("runs >= 1")
    if nbytes < PAGE or nbytes % PAGE:
        raise ValueError("nbytes: a positive multiple of 4096")
    if not modes:
        raise ValueError("modes: at least one")
    prefix = prefix or f"livemig-rawtcp-{os.getpid()}-{secrets.token_hex(3)}"
    src = dst = None
    out: dict[str, dict] = {}
    fresh_no = 0
    try:
        src = ShmBuffer(f"{prefix}-tcp-src", nbytes, create=True)
        fill_random(src.mm, nbytes)
        src_digest = digest(src.mm, nbytes)
        for key, mode in modes.items():
            if not mode.fresh and dst is None:
                dst = ShmBuffer(f"{prefix}-tcp-dst", nbytes, create=True)
                populate(dst.mm, nbytes, write=True)
            rows: list[dict] = []
            for i in range(runs):
                if mode.fresh:
                    row = _fresh_run(src, f"{prefix}-tcp-fresh{fresh_no}", nbytes, src_digest, mode)
                    fresh_no += 1
                else:
                    row = _one_run(src, dst, nbytes, src_digest, mode)
                rows.append(row)
                if log is not None:
                    log(f"raw TCP ({mode.label}) run {i + 1}/{runs}: {row['gibps']:.2f} GiB/s "
                        f"({row['seconds'] * 1000:.0f} ms, verified={row['verified']})")
            out[key] = _summary(mode, nbytes, rows)
    finally:
        for b in (src, dst):
            if b is not None:
                b.close()
                b.unlink()
    return out


def measure(nbytes: int = GiB, runs: int = 3, *, prefix: str | None = None, log=None, fresh: bool = False,
            connections: int = 1) -> dict:
    """Median of ``runs`` raw-TCP transfers of ``nbytes`` in one mode; see the module doc."""
    mode = Mode(fresh=fresh, connections=connections)
    return measure_modes(nbytes, {mode.name: mode}, runs, prefix=prefix, log=log)[mode.name]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.bench.rawtcp", description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=1024, help="bytes per transfer, MiB (default 1024)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--fresh", action="store_true",
                   help="receive into a new, never pre-faulted shm file per run (end to end)")
    p.add_argument("--connections", type=int, default=1, metavar="N",
                   help=f"parallel TCP connections, one thread each per side (1..{MAX_CONNECTIONS}, default 1)")
    ns = p.parse_args(argv)
    if not 1 <= ns.connections <= MAX_CONNECTIONS:
        p.error(f"--connections: 1..{MAX_CONNECTIONS}")
    if ns.mib < 1 or ns.runs < 1:
        p.error("--mib and --runs: >= 1")
    r = measure(ns.mib * MiB, ns.runs, log=lambda m: print(m, file=sys.stderr), fresh=ns.fresh,
                connections=ns.connections)
    g, ms = r["gibps"], r["ms"]
    print(f"raw TCP {ns.mib} MiB, {r['label']}, {r['runs']} runs: {g['median']:.2f} GiB/s "
          f"[{g['min']:.2f}-{g['max']:.2f}] = {r['gbit_s_median']} Gbit/s, {ms['median']:.0f} ms "
          f"[{ms['min']:.0f}-{ms['max']:.0f}], verified={r['verified']}, cpu send/recv "
          f"{r['send_cpu_pct']:.0f}%/{r['recv_cpu_pct']:.0f}%")
    return 0 if r["verified"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
