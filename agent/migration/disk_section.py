"""The "disk" section: a VM's disks in a live migration (shared or copied).

One section carries every disk of the VM. Its page space is the disks one
after the other, in 4 KiB units: disk i starts at page ``base_i`` (the sum
of the earlier disks' pages) and its block b is pages
``[base_i + 16 b, base_i + 16 b + 16)``.

Modes (``options["storage_mode"]``, chosen by :func:`plan` before each attempt):

* **shared**: the destination sees the same files. Setup proves it: the
  source writes a random token beside each disk
  (``<disk>.livemig-probe-<id>``, removed in cleanup) and sends the token and
  the digests of sampled 64 KiB blocks; the destination reads the token
  through the same path (or the one ``[storage] shared_paths`` maps it to)
  and compares the blocks; otherwise it refuses with the reason. Nothing is
  sent in the rounds. At the pause (the paused guest does no disk IO) the
  source fdatasyncs each disk and closes its own descriptors; the
  destination drops its cache and digests the sampled blocks again (verify);
  ``activate()`` registers the same files for the destination guest. The
  files are never copied, renamed or deleted.
* **copy** (shared-nothing): round 1 is the bulk pass over the data extents
  (SEEK_DATA) after tracking started (collect-and-discard, fdatasync, scan:
  disk.py step 1); later rounds send the blocks the guest marked dirty;
  complete() sends the last ones with the guest paused. All-zero blocks go
  as ZERO runs (holes stay holes). The destination writes into staging files
  ``.<name>.img.livemig-<migration id>`` listed first in a persisted manifest
  (``<data_dir>/incoming-storage/<id>.json``), reads back what it wrote
  (in the background during pre-copy, the rest at verify, after fdatasync and
  POSIX_FADV_DONTNEED), and ``activate()`` links the staging files to their
  final names. Digests: 1 MiB chunk digests (disk.chunk_digests) of the
  per-block digests of what the source read vs what the destination read
  back from its files. The source's files are deleted only once the
  destination runs the VM (``release_info``); the destination deletes exactly
  the files of its manifest on any failure before it owns the VM, also after
  a restart (:func:`recover_incoming`).

Ordering "disks first": the section's pending bytes include the unsent part
of its bulk pass, and round 1 ends only when every stream section finished
it, so the driver never pauses before the bulk copy is done; RAM and disk
share round 1 (the driver gives each 16 MiB turns).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import time

from memstore import BLOCK_SIZE, PAGE_SIZE, DiskError, DiskImage, DiskMap, PageRun, add_disk

from agent.daemon.files import fsync_dir, write_json
from agent.errors import AdmissionRefused, AgentError
from agent.migration.disk import CHUNK_BLOCKS, DIGEST_BYTES, ZERO_BLOCK_DIGEST, block_digest, chunk_digests
from agent.migration.section import IncomingSection, OutgoingSection
from agent.observe.logs import get_logger
from protocol import BatchFlags, ErrorCode, PageBatch, RemoteProtocolError

log = get_logger("livemig.disk_section")

NAME = "disk"
MODES = ("auto", "shared", "copy")
PPB = BLOCK_SIZE // PAGE_SIZE             # pages per block (16)
PROBE_SAMPLES = 4
READBACK_BACKLOG_BLOCKS = 1024            # 64 MiB written and not read back: read it back now (background)
SPACE_HEADROOM = 1.05
SPACE_MIN_SPARE = 16 * 2**20
MANIFEST_DIR = "incoming-storage"
CHUNK_PAGES = CHUNK_BLOCKS * PPB


def _read_block_digest(fd: int, block: int, drop: bool) -> bytes:
    off = block * BLOCK_SIZE
    if drop:
        os.posix_fadvise(fd, off, BLOCK_SIZE, os.POSIX_FADV_DONTNEED)
    data = os.pread(fd, BLOCK_SIZE, off)
    return block_digest(data + bytes(BLOCK_SIZE - len(data)))


# ---------------------------------------------------------------------------
# shared storage: probe tokens beside the disks


def write_probes(vm, probe_id: str) -> list[dict]:
    """Write a token beside each disk and sample its blocks; the shared setup info."""
    out = []
    try:
        for d in vm.record.disks:
            path = d["path"]
            token = secrets.token_hex(32)
            tpath = f"{path}.livemig-probe-{probe_id}"
            fd = os.open(tpath, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, token.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            out.append({"name": d["name"], "path": path, "size": d["size_bytes"],
                        "attached": bool(d.get("attached")), "token_path": tpath, "token": token})
            fsync_dir(os.path.dirname(path))
            with DiskImage.open(path, readonly=True) as img:
                img.fdatasync()
                runs = img.data_blocks() or [PageRun(0, img.nblocks)]
                blocks = set()
                for _ in range(PROBE_SAMPLES):
                    r = random.choice(runs)
                    blocks.add(r.first + random.randrange(r.count))
                out[-1]["samples"] = [[b, block_digest(img.read_blocks(b, 1))] for b in sorted(blocks)]
    except BaseException:
        remove_probes(out)
        raise
    return out


def remove_probes(disks: list[dict]) -> None:
    for d in disks:
        try:
            os.unlink(d["token_path"])
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("probe_token_not_removed", path=d["token_path"], error=str(exc))


def _shared_check(info: dict, host) -> list[tuple[dict, str]]:
    """AdmissionRefused unless this host sees every disk of ``info``; returns (disk, local path)."""
    out = []
    for d in _disks(info):
        for key in ("path", "token_path", "token"):
            if not isinstance(d.get(key), str) or "\0" in d[key]:
                raise RemoteProtocolError(f"disk setup: bad {key}", ErrorCode.MALFORMED)
        samples = d.get("samples", [])
        if not isinstance(samples, list) or len(samples) > 64 or not all(
                isinstance(x, list) and len(x) == 2 and type(x[0]) is int and 0 <= x[0] < d["size"] // BLOCK_SIZE
                and isinstance(x[1], bytes) for x in samples):
            raise RemoteProtocolError("disk setup: bad samples", ErrorCode.MALFORMED)
        local = host.cfg.storage.local_path(d["path"])
        tpath = host.cfg.storage.local_path(d["token_path"])
        where = f"{host.name} cannot see the shared disk {d['name']} at {local}"
        try:
            with open(tpath, "rb") as f:
                seen = f.read(256).decode(errors="replace")
        except OSError as exc:
            raise AdmissionRefused(f"{where}: the source's probe token {tpath} is not visible here "
                                   f"({exc.strerror}); use --storage copy, or map the path in "
                                   f"[storage] shared_paths", ErrorCode.INCOMPATIBLE) from None
        if seen != d["token"]:
            raise AdmissionRefused(f"{where}: the probe token {tpath} holds other bytes (another file "
                                   f"of that name?)", ErrorCode.INCOMPATIBLE)
        try:
            fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise AdmissionRefused(f"{where}: {exc.strerror}", ErrorCode.INCOMPATIBLE) from None
        try:
            size = os.fstat(fd).st_size
            if size != d["size"]:
                raise AdmissionRefused(f"{where}: it is {size} bytes here, {d['size']} on the source",
                                       ErrorCode.INCOMPATIBLE)
            # A running guest may rewrite a sampled block between the source's
            # read and ours: at least half must match (another file matches none
            # but its holes); verify compares them exactly with the guest paused.
            same = sum(_read_block_digest(fd, b, True) == dig for b, dig in samples)
            if samples and same * 2 < len(samples):
                raise AdmissionRefused(f"{where}: {len(samples) - same} of {len(samples)} sampled blocks "
                                       f"differ from the source's", ErrorCode.INCOMPATIBLE)
        finally:
            os.close(fd)
        out.append((d, local))
    return out


def _disks(info: dict) -> list[dict]:
    disks = info.get("disks", [])
    if not isinstance(disks, list) or not all(isinstance(d, dict) for d in disks):
        raise RemoteProtocolError("disk setup: disks must be a list of maps", ErrorCode.MALFORMED)
    for d in disks:
        for key, typ in (("name", str), ("size", int)):
            if not isinstance(d.get(key), typ):
                raise RemoteProtocolError(f"disk setup: bad {key} {d.get(key)!r:.60}", ErrorCode.MALFORMED)
        if d["size"] <= 0 or d["size"] % BLOCK_SIZE:
            raise RemoteProtocolError(f"disk setup: bad size {d['size']}", ErrorCode.MALFORMED)
    return disks


# ---------------------------------------------------------------------------
# copy: where the destination puts the files, and its manifest


def _dest_paths(info: dict, host, vm_name: str) -> list[str]:
    base = info.get("dest_dir") or os.path.join(os.path.abspath(host.cfg.agent.data_dir), "disks", vm_name)
    out = []
    for d in _disks(info):
        p = d.get("dest") or os.path.join(base, f"{d['name']}.img")
        if not isinstance(p, str) or "\0" in p:
            raise RemoteProtocolError(f"disk setup: bad destination path {p!r:.80}", ErrorCode.MALFORMED)
        out.append(os.path.abspath(p))
    return out


def _existing_dir(path: str) -> str:
    d = os.path.dirname(path)
    while d and not os.path.isdir(d):
        d = os.path.dirname(d)
    return d or "/"


def _local_disk_owners(host) -> dict[str, str]:
    return {os.path.realpath(d["path"]): vm.name for vm in host.registry for d in vm.record.disks}


def _copy_check(info: dict, host, vm_name: str) -> list[str]:
    """AdmissionRefused unless the copies can be made here: free names, not
    another VM's disks, and the space (statvfs vs the allocated bytes)."""
    paths = _dest_paths(info, host, vm_name)
    owners = _local_disk_owners(host)
    need: dict[int, tuple[str, int]] = {}
    for d, p in zip(_disks(info), paths):
        if os.path.lexists(p):
            raise AdmissionRefused(f"{host.name}: {p} exists; the copy of disk {d['name']} would overwrite it "
                                   f"(pick another --storage-dest or --map)", ErrorCode.INCOMPATIBLE)
        if os.path.realpath(p) in owners:
            raise AdmissionRefused(f"{host.name}: {p} is a disk of VM {owners[os.path.realpath(p)]}",
                                   ErrorCode.INCOMPATIBLE)
        top = _existing_dir(p)
        dev = os.stat(top).st_dev
        alloc = d.get("allocated", d["size"])
        prev = need.get(dev, (top, 0))
        need[dev] = (prev[0], prev[1] + (alloc if isinstance(alloc, int) and alloc >= 0 else d["size"]))
    if len(set(paths)) != len(paths):
        raise AdmissionRefused("two disks would be copied to the same file", ErrorCode.INCOMPATIBLE)
    for top, nbytes in need.values():
        st = os.statvfs(top)
        free = st.f_bavail * st.f_frsize
        want = int(nbytes * SPACE_HEADROOM) + SPACE_MIN_SPARE
        if free < want:
            raise AdmissionRefused(
                f"not enough disk space on {host.name} for the disks: {top} has {free / 2**20:.0f} MiB free, "
                f"the copies need {want / 2**20:.0f} MiB ({nbytes / 2**20:.0f} MiB allocated + headroom)",
                ErrorCode.NO_MEMORY)
    return paths


def manifest_path(host, migration_id: str) -> str:
    return os.path.join(host.cfg.agent.data_dir, MANIFEST_DIR, f"{migration_id}.json")


def _save_manifest(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    write_json(path, doc, sync_dir=True)


def _delete_created(doc: dict) -> list[str]:
    """Unlink exactly the files the manifest says we created (matched by
    (st_dev, st_ino) once known; a staging name before that: only we make
    those), then the directories we made, if empty. Returns what was removed."""
    removed = []
    for f in doc.get("files", []):
        ident = f.get("ident")
        for p in (f["staging"], f["final"]):
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if ident is not None and [st.st_dev, st.st_ino] != ident:
                continue                      # not the file we created: never delete it
            if ident is None and p != f["staging"]:
                continue
            os.unlink(p)
            removed.append(p)
    for d in reversed(doc.get("dirs", [])):
        try:
            os.rmdir(d)
        except OSError:
            pass
    return removed


def recover_incoming(host) -> dict:
    """At agent start: finish the cleanup of inbound copies that failed (or
    were cut by a crash) before this host owned the VM; a manifest of a
    migration this host took (or whose VM it runs) is only dropped. Also
    removes probe tokens left beside this host's disks by a crashed source."""
    d = os.path.join(host.cfg.agent.data_dir, MANIFEST_DIR)
    out = {"manifests": 0, "files_removed": 0, "tokens_removed": 0}
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        names = []
    running = {vm.record.migration_id for vm in host.registry if vm.record.state != "incoming"}
    for fn in names:
        p = os.path.join(d, fn)
        if fn.endswith(".tmp"):
            os.unlink(p)
            continue
        try:
            with open(p) as f:
                doc = json.load(f)
        except (OSError, ValueError) as exc:
            log.error("storage_manifest_unreadable", path=p, error=str(exc))
            continue
        mid = doc.get("migration_id", "")
        if not (host.was_taken(mid) or mid in running):
            removed = _delete_created(doc)
            out["files_removed"] += len(removed)
            log.info("incoming_storage_cleaned", migration_id=mid, removed=removed)
        os.unlink(p)
        out["manifests"] += 1
    for vm in host.registry:
        for disk in vm.record.disks:
            dirname, base = os.path.split(disk["path"])
            try:
                entries = os.listdir(dirname)
            except OSError:
                continue
            for e in entries:
                if e.startswith(base + ".livemig-probe-"):
                    try:
                        os.unlink(os.path.join(dirname, e))
                        out["tokens_removed"] += 1
                    except OSError:
                        pass
    return out


# ---------------------------------------------------------------------------
# the source


class _Window:
    """A buffer that ``stream.pages`` slices by section page number."""

    def __init__(self, view: memoryview, base_page: int) -> None:
        self.view, self.off = view, base_page * PAGE_SIZE

    def __getitem__(self, s: slice) -> memoryview:
        return self.view[s.start - self.off:s.stop - self.off]


class _SrcDisk:
    def __init__(self, vm, index: int, rec: dict, base_page: int) -> None:
        self.index, self.name, self.path = index, rec["name"], rec["path"]
        self.rec = rec
        self.base_page = base_page
        self.map = DiskMap.attach(vm.ram.name, index)
        try:
            self.img = DiskImage.open(self.path, readonly=True, block_size=self.map.block_size)
        except BaseException:
            self.map.close()
            raise
        if self.map.block_size != BLOCK_SIZE:
            self.close()
            raise AgentError(f"disk {self.name}: block size {self.map.block_size} is not {BLOCK_SIZE}")
        self.nblocks = self.img.nblocks
        self.collector = self.map.collector()
        self.digest = bytearray(ZERO_BLOCK_DIGEST * self.nblocks)
        self.allocated = self.img.allocated_bytes()
        self.bytes_copied = 0

    def close(self) -> None:
        self.collector = None
        self.img.close()
        self.map.close()


def _chunks(first: int, count: int):
    while count > 0:
        n = min(count, CHUNK_BLOCKS - first % CHUNK_BLOCKS)
        yield first, n
        first, count = first + n, count - n


class DiskOut(OutgoingSection):
    NAME = NAME

    def __init__(self, vm, stream, host, options: dict) -> None:
        self.vm, self.stream, self.host = vm, stream, host
        self.mode = options.get("storage_mode") or "copy"
        self.options = options
        self.disks: list[_SrcDisk] = []
        self.probes: list[dict] = []
        self.slot = False
        self._round = 0
        self._work = iter(())
        self._bulk_left = 0
        self._buf = bytearray(CHUNK_BLOCKS * BLOCK_SIZE)
        self._view = memoryview(self._buf)
        if self.mode == "copy":
            if not host.storage_slots.try_acquire():
                from agent.migration.source import Requeue
                raise Requeue(f"{host.name} runs {host.storage_slots.in_use} of {host.storage_slots.limit} "
                              f"storage migrations")
            self.slot = True
        try:
            base = 0
            for i, rec in enumerate(vm.record.disks):
                self.disks.append(_SrcDisk(vm, i, rec, base))
                base += self.disks[-1].nblocks * PPB
            if self.mode == "shared":
                self.probes = write_probes(vm, stream.job.id)
        except BaseException:
            self._close()
            raise
        stream.job.storage = {"storage_mode": self.mode, "disks": self._disk_report()}

    def _disk_report(self) -> list[dict]:
        return [{"name": d.name, "size_bytes": d.img.size_bytes if not d.img.closed else d.rec["size_bytes"],
                 "allocated_bytes": d.allocated, "bytes_copied": d.bytes_copied} for d in self.disks]

    def setup_info(self) -> dict:
        if self.mode == "shared":
            return {"mode": "shared", "disks": self.probes}
        m = self.options.get("map") or {}
        return {"mode": "copy", "vm": self.vm.name, "dest_dir": self.options.get("storage_dest") or None,
                "disks": [{"name": d.name, "size": d.img.size_bytes, "allocated": d.allocated,
                           "attached": bool(d.rec.get("attached")), "dest": m.get(d.name)} for d in self.disks]}

    def release_info(self) -> dict:
        return {"delete_files": [d.path for d in self.disks]} if self.mode == "copy" else {}

    # ---- rounds ---------------------------------------------------------
    def begin_round(self, round_no: int) -> None:
        self._round = round_no
        if self.mode != "copy":
            return
        if round_no == 1:
            work = []
            for d in self.disks:
                d.collector.collect()                 # track before the scan (disk.py step 1)
                d.img.fdatasync()
                for r in d.img.data_blocks():
                    work.extend((d, f, n) for f, n in _chunks(r.first, r.count))
            self._bulk_left = sum(n for _, _, n in work)
            self._work = iter(work)
        else:
            self._work = iter(self._collect())

    def _collect(self) -> list:
        work = []
        for d in self.disks:
            for first, count in d.collector.collect():
                work.extend((d, f, n) for f, n in _chunks(first, count))
        return work

    async def iterate(self, budget_bytes: int) -> bool:
        sent = 0
        for d, first, count in self._work:
            sent += await self._send(d, first, count)
            if self._round == 1:
                self._bulk_left -= count
            if sent >= budget_bytes:
                return False
        return True

    async def _send(self, d: _SrcDisk, first: int, count: int) -> int:
        # A new buffer per chunk: the transport may still hold views of the
        # previous one (a TLS write backlog keeps the objects, not copies).
        view = memoryview(bytearray(count * BLOCK_SIZE))
        await asyncio.to_thread(d.img.readinto_blocks, first, view)
        data: list[tuple[int, int]] = []
        zero: list[tuple[int, int]] = []
        for i in range(count):
            b = first + i
            dig = block_digest(view[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
            d.digest[b * DIGEST_BYTES:(b + 1) * DIGEST_BYTES] = dig
            runs = zero if dig == ZERO_BLOCK_DIGEST else data
            page = d.base_page + b * PPB
            if runs and runs[-1][0] + runs[-1][1] == page:
                runs[-1] = (runs[-1][0], runs[-1][1] + PPB)
            else:
                runs.append((page, PPB))
        nbytes = 0
        if data:
            window = _Window(view, d.base_page + first * PPB)
            nbytes = await self.stream.pages(self, self._round, data, window)
            d.bytes_copied += nbytes
        if zero and self._round > 1:               # round 1: the destination's new file is holes already
            await self.stream.zero(self, self._round, zero)
        return nbytes

    def pending_estimate(self) -> int:
        if self.mode != "copy":
            return 0
        return (self._bulk_left + sum(d.collector.count() for d in self.disks)) * BLOCK_SIZE

    # ---- the pause --------------------------------------------------------
    async def complete(self) -> None:
        if self.mode == "copy":
            self._round += 1
            self._work = iter(self._collect())
            await self.iterate(1 << 62)
        else:
            # The guest is paused (acknowledged: no disk write in flight). Flush
            # its writes to the shared files, then let go of our descriptors.
            await asyncio.to_thread(lambda: [d.img.fdatasync() for d in self.disks])
        self.stream.job.storage["disks"] = self._disk_report()

    async def digests(self, mode: str) -> tuple[int, bytes]:
        if self.mode == "shared":
            return 1, await asyncio.to_thread(self._shared_digests)
        if mode == "full":
            await asyncio.to_thread(self._rehash_all)
        return CHUNK_PAGES, b"".join(chunk_digests(d.digest) for d in self.disks)

    def _shared_digests(self) -> bytes:
        out = []
        for d, p in zip(self.disks, self.probes):
            for b, _ in p["samples"]:
                out.append(_read_block_digest(d.img.fd, b, False))
        return b"".join(out)

    def _rehash_all(self) -> None:
        for d in self.disks:
            d.digest[:] = ZERO_BLOCK_DIGEST * d.nblocks
            for r in d.img.data_blocks():
                for first, n in _chunks(r.first, r.count):
                    view = self._view[:n * BLOCK_SIZE]
                    d.img.readinto_blocks(first, view)
                    for i in range(n):
                        b = first + i
                        d.digest[b * DIGEST_BYTES:(b + 1) * DIGEST_BYTES] = block_digest(
                            view[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])

    async def cleanup(self, committed: bool) -> None:
        self._close()

    def _close(self) -> None:
        remove_probes(self.probes)
        self.probes = []
        for d in self.disks:
            try:
                d.close()
            except Exception:
                log.exception("disk_close_failed", disk=d.name)
        self.disks = []
        if self.slot:
            self.slot = False
            self.host.storage_slots.release()


# ---------------------------------------------------------------------------
# the destination


class _DstDisk:
    def __init__(self, name: str, size: int, base_page: int, attached: bool) -> None:
        self.name, self.size, self.base_page, self.attached = name, size, base_page, attached
        self.nblocks = size // BLOCK_SIZE
        self.final = self.staging = ""
        self.img: DiskImage | None = None
        self.written = bytearray(self.nblocks)
        self.digest = bytearray(ZERO_BLOCK_DIGEST * self.nblocks)
        self.unverified: set[int] = set()
        self.bytes_received = 0
        self.samples: list = []


class DiskIn(IncomingSection):
    NAME = NAME

    def __init__(self, vm, host) -> None:
        self.vm, self.host = vm, host
        self.mode = ""
        self.disks: list[_DstDisk] = []
        self.slot = False
        self.manifest: dict | None = None
        self.mpath = ""
        self.npages = 0
        self._bufs: dict[int, bytearray] = {}
        self._readback: asyncio.Task | None = None

    async def setup(self, info: dict) -> None:
        self.mode = info.get("mode", "")
        if not info.get("disks"):
            return
        base = 0
        for d in _disks(info):
            self.disks.append(_DstDisk(d["name"], d["size"], base, bool(d.get("attached"))))
            base += d["size"] // PAGE_SIZE
        self.npages = base
        if self.mode == "shared":
            for (src, local), d in zip(await asyncio.to_thread(_shared_check, info, self.host), self.disks):
                d.final = local
                d.samples = src.get("samples", [])
            return
        if self.mode != "copy":
            raise RemoteProtocolError(f"disk setup: unknown mode {self.mode!r:.40}", ErrorCode.MALFORMED)
        if not self.host.storage_slots.try_acquire():
            s = self.host.storage_slots
            raise AdmissionRefused(f"{self.host.name} runs {s.in_use} of {s.limit} storage migrations", ErrorCode.BUSY)
        self.slot = True
        paths = await asyncio.to_thread(_copy_check, info, self.host, self.vm.name)
        await asyncio.to_thread(self._create, paths)

    def _create(self, paths: list[str]) -> None:
        mid = self.vm.record.migration_id
        self.mpath = manifest_path(self.host, mid)
        self.manifest = {"migration_id": mid, "vm": self.vm.name, "created": time.time(), "files": [], "dirs": []}
        for d, p in zip(self.disks, paths):
            d.final = p
            d.staging = os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.livemig-{mid}")
            entry = {"staging": d.staging, "final": d.final, "ident": None}
            self.manifest["files"].append(entry)
            missing = []
            parent = os.path.dirname(p)
            while not os.path.isdir(parent):
                missing.append(parent)
                parent = os.path.dirname(parent)
            self.manifest["dirs"].extend(reversed(missing))
            _save_manifest(self.mpath, self.manifest)        # before anything exists
            for m in reversed(missing):
                os.mkdir(m, 0o700)
            try:
                d.img = DiskImage.create(d.staging, d.size)
            except DiskError as exc:
                raise AdmissionRefused(f"{self.host.name}: {exc}", ErrorCode.INCOMPATIBLE) from exc
            st = os.fstat(d.img.fd)
            entry["ident"] = [st.st_dev, st.st_ino]
            _save_manifest(self.mpath, self.manifest)

    # ---- receiving ------------------------------------------------------
    def _locate(self, first: int, count: int) -> tuple[_DstDisk, int, int]:
        if first % PPB or count % PPB or count <= 0:
            raise RemoteProtocolError(f"disk pages {first}+{count} are not whole blocks", ErrorCode.MALFORMED)
        for d in self.disks:
            if d.base_page <= first and first + count <= d.base_page + d.nblocks * PPB:
                return d, (first - d.base_page) // PPB, count // PPB
        raise RemoteProtocolError(f"disk pages {first}+{count} are outside every disk", ErrorCode.MALFORMED)

    def payload_sink(self, batch: PageBatch):
        if self.mode != "copy":
            raise RemoteProtocolError("a shared-storage migration takes no disk blocks", ErrorCode.UNEXPECTED)
        for first, count in batch.runs:                  # all checked before any view exists
            self._locate(first, count)
        # One buffer per batch: the transport may take the next batch's payload
        # before on_batch of this one ran (RAM's views are distinct pages anyway).
        buf = self._bufs[id(batch)] = bytearray(batch.payload_len)
        view = memoryview(buf)
        out, off = [], 0
        for _, count in batch.runs:
            out.append(view[off:off + count * PAGE_SIZE])
            off += count * PAGE_SIZE
        return out

    def on_batch(self, batch: PageBatch) -> None:
        if self.mode != "copy":
            raise RemoteProtocolError("a shared-storage migration takes no disk blocks", ErrorCode.UNEXPECTED)
        try:
            if batch.flags & BatchFlags.ZERO:
                for first, count in batch.runs:
                    d, b, n = self._locate(first, count)
                    if any(d.written[b:b + n]):
                        d.img.punch_blocks(b, n)
                    d.written[b:b + n] = bytes(n)
                    d.unverified.update(range(b, b + n))
            else:
                view, off = memoryview(self._bufs.pop(id(batch))), 0
                for first, count in batch.runs:
                    d, b, n = self._locate(first, count)
                    d.img.write_blocks(b, view[off:off + n * BLOCK_SIZE])
                    off += n * BLOCK_SIZE
                    d.written[b:b + n] = b"\x01" * n
                    d.unverified.update(range(b, b + n))
                    d.bytes_received += n * BLOCK_SIZE
                view.release()
        except DiskError as exc:
            raise AgentError(f"{self.host.name}: cannot write the copy of the disk: {exc}") from exc
        if (self._readback is None or self._readback.done()) and \
                sum(len(d.unverified) for d in self.disks) >= READBACK_BACKLOG_BLOCKS:
            self._start_readback()

    def _start_readback(self) -> None:
        if self._readback is not None and self._readback.done() and self._readback.exception() is not None:
            raise AgentError(f"read-back of the disk copy failed: {self._readback.exception()}")
        todo = []
        for d in self.disks:
            todo.append((d, sorted(d.unverified)))
            d.unverified.clear()
        self._readback = asyncio.get_running_loop().create_task(asyncio.to_thread(self._read_back, todo))

    def _read_back(self, todo) -> None:
        """fdatasync, then the digest of each block as the file holds it (read
        through a new descriptor after POSIX_FADV_DONTNEED)."""
        for d, blocks in todo:
            if not blocks:
                continue
            d.img.fdatasync()
            fd = os.open(d.staging, os.O_RDONLY | os.O_CLOEXEC)
            try:
                for b in blocks:
                    d.digest[b * DIGEST_BYTES:(b + 1) * DIGEST_BYTES] = _read_block_digest(fd, b, True)
            finally:
                os.close(fd)

    # ---- verify, activate ----------------------------------------------------
    async def digests(self, mode: str) -> tuple[int, bytes]:
        if self.mode == "shared":
            return 1, await asyncio.to_thread(self._shared_digests)
        if not self.disks:
            return CHUNK_PAGES, b""
        if self._readback is not None:
            await self._readback
        if mode == "full":
            for d in self.disks:
                d.unverified.update(range(d.nblocks))
        todo = [(d, sorted(d.unverified)) for d in self.disks]
        for d in self.disks:
            d.unverified.clear()
        await asyncio.to_thread(self._read_back, todo)
        await asyncio.to_thread(self._check_extents)
        return CHUNK_PAGES, b"".join(chunk_digests(d.digest) for d in self.disks)

    def _check_extents(self) -> None:
        """The copy holds data only where blocks were written (an offset bug
        or a stray writer would put it elsewhere)."""
        for d in self.disks:
            for r in d.img.data_blocks():
                if d.written[r.first:r.first + r.count].count(0):
                    b = r.first + d.written[r.first:r.first + r.count].index(0)
                    raise AgentError(f"disk {d.name}: the copy {d.staging} holds data in block {b}, "
                                     f"which was never written to it")

    def _shared_digests(self) -> bytes:
        out = []
        for d in self.disks:
            fd = os.open(d.final, os.O_RDONLY | os.O_CLOEXEC)
            try:
                out.extend(_read_block_digest(fd, b, True) for b, _ in d.samples)
            finally:
                os.close(fd)
        return b"".join(out)

    async def activate(self) -> None:
        if not self.disks:
            return
        if self.mode == "copy":
            await asyncio.to_thread(self._publish)
        for d in self.disks:
            add_disk(self.vm.ram, d.final)
        self.vm.record.disks = [{"name": d.name, "path": d.final, "size_bytes": d.size,
                                 "attached": d.attached if self.mode == "shared" else False} for d in self.disks]
        job = self.host.jobs.get(self.vm.record.migration_id)
        if job is not None:
            job.storage = {"storage_mode": self.mode, "disks": [
                {"name": d.name, "path": d.final, "bytes_copied": d.bytes_received} for d in self.disks]}

    def _publish(self) -> None:
        """Staging -> final name (link: never over an existing file), fdatasynced."""
        for d in self.disks:
            d.img.fdatasync()
            os.link(d.staging, d.final)
            os.unlink(d.staging)
            fsync_dir(os.path.dirname(d.final))

    async def cleanup(self, committed: bool) -> None:
        if self._readback is not None:
            try:
                await self._readback
            except Exception:
                pass
        for d in self.disks:
            if d.img is not None:
                d.img.close()
        if self.manifest is not None:
            doc, self.manifest = self.manifest, None
            if not committed:
                removed = await asyncio.to_thread(_delete_created, doc)
                log.info("incoming_storage_removed", files=removed)
            try:
                os.unlink(self.mpath)
            except FileNotFoundError:
                pass
        if self.slot:
            self.slot = False
            self.host.storage_slots.release()


# ---------------------------------------------------------------------------
# registration hooks


def out_factory(vm, stream, host, options):
    if not vm.record.disks:
        return None
    return DiskOut(vm, stream, host, options)


def in_factory(vm, host):
    return DiskIn(vm, host)


def probe(info: dict, host) -> None:
    """The destination's dry-run check of a disk setup (see DiskIn.setup)."""
    if not info or not info.get("disks"):
        return
    if info.get("mode") == "shared":
        _shared_check(info, host)
    elif info.get("mode") == "copy":
        _copy_check(info, host, info.get("vm") or "_")
    else:
        raise RemoteProtocolError(f"disk setup: unknown mode {info.get('mode')!r:.40}", ErrorCode.MALFORMED)


async def plan(host, vm, target: str, options: dict) -> dict:
    """Before each attempt: storage auto|shared|copy -> options["storage_mode"].
    auto asks the destination in a dry run whether it sees the files."""
    if not vm.record.disks:
        return options
    want = options.get("storage") or "auto"
    if want != "auto":
        options["storage_mode"] = want
        return options
    from agent.migration.precheck import precheck

    probes = await asyncio.to_thread(write_probes, vm, f"plan-{secrets.token_hex(4)}")
    try:
        answer = await precheck(host, vm, target, setup={NAME: {"mode": "shared", "disks": probes}})
    finally:
        remove_probes(probes)
    options["storage_mode"] = "shared" if answer["ok"] else "copy"
    log.info("storage_mode_chosen", vm=vm.name, target=target, mode=options["storage_mode"],
             reason=answer.get("reason"))
    return options
