"""VM disks: raw sparse image files, and a shared-memory dirty-block map each.

A disk is two things:

* the **image**, a raw file of fixed virtual size anywhere on the host's
  filesystems (the agent puts it at ``<data-dir>/disks/<vm>/<NAME>.img``).
  :meth:`DiskImage.create` makes it with ``O_CREAT|O_EXCL`` + ``ftruncate``,
  so every block starts as a hole; :meth:`DiskImage.open` attaches an
  existing one. The guest writes it with ``pwrite`` only, never mmap (mmap
  breaks SEEK_DATA on some filesystems and makes the write/mark order
  harder to reason about), and readers use ``pread``.
* the **disk map**, a small file in shm_dir() named ``<ram segment>.d<i>``
  (i = 0, 1, ...), holding the disk's geometry, its path, and one dirty byte
  per block::

      0                  1024           2048             3072      4096          end
      | header slots     | path         | next_path      | zero    | dirty map:   |
      | (u64, see below) | (UTF-8)      | (UTF-8)        |         | 1 byte/block |

      end = 4096 + round_up(nblocks, 4096)

  slot 0 magic b"LMDISK01", 1 layout version, 2 disk index, 3 size_bytes,
  4 block_size, 5 nblocks, 6 path_len, 7 next_path_len; 8..127 reserved
  (zero; room for the storage mirror's control words).

Why a separate segment per disk and not a region of the RAM segment: the RAM
segment's layout and size stay exactly what they were, so running guests
and VMs without disks are untouched (``python -m memstore.guest SEGMENT``
works as before and re-adopts as before), a disk can be added to an existing
segment, and a disk's map can be sized to the disk. The guest finds its
disks from the RAM segment alone: the control page's ``ndisks`` says how
many maps ``<segment>.d0 ..`` there are, and each map holds its image's path
and size. A restarted guest therefore opens the same files.

Block size: 64 KiB (DISK_BLOCK_SIZE), as QEMU's raw block-dirty bitmaps use
by default: a 1 TiB disk needs a 16 MiB map, a block is a reasonable unit
for one ``pread``/``pwrite`` of the copier (~16 per 1 MiB copy chunk), and
most filesystems allocate in 4 KiB units, so a block is never smaller than
an allocation unit. The guest's disk writes are whole blocks too.

Dirty contract -- the same as memstore/dirtymap.py, with blocks for pages:
the guest ``pwrite``s the block (W: the data is in the page cache, visible
to any ``pread``) and *then* sets the block's byte (M). The copier uses
:meth:`DiskMap.collector` (a :class:`~memstore.dirtymap.DirtyMap` over the
map): collect() snapshots, clears exactly the runs it saw, and only then
does the copier ``pread`` those blocks. The ordering argument in
dirtymap.py carries over unchanged.

Single writer per field: the agent writes everything at creation and
``next_path`` (:meth:`DiskMap.stage_path`) before a REOPEN; the guest
writes ``path`` when a REOPEN succeeded (so ``path`` is always the file the
guest writes, and a restarted guest opens it) and the dirty bytes.

Switching files under a running guest (a storage move): the agent pauses
the disk IO (``DiskCmd.PAUSE``, acknowledged: no write in flight), finishes
its copy, stages the new path and sends ``DiskCmd.REOPEN`` for disk i
(acknowledged with ``disk_result`` 0, or an errno and the old file kept),
then ``DiskCmd.RUN``. RAM writes go on throughout; see
:func:`pause_disk_io`, :func:`reopen_disk`, :func:`resume_disk_io`.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import stat
import time
from typing import NamedTuple

from .control import MAX_DISKS, ControlBlock, DiskCmd, GuestState
from .dirtymap import DirtyMap
from .errors import DiskError, GuestError
from .layout import DISK_BLOCK_SIZE, PAGE_SIZE, PageRun, round_up
from .segment import GuestRam, list_segments, reserve_file, segment_path, undo_create

__all__ = [
    "BLOCK_SIZE",
    "PATH_MAX_BYTES",
    "DiskImage",
    "DiskMap",
    "DiskInfo",
    "disk_map_name",
    "parse_disk_map_name",
    "list_disk_maps",
    "unlink_disk_maps",
    "add_disk",
    "list_disks",
    "disk_sizes",
    "remove_disks",
    "pause_disk_io",
    "resume_disk_io",
    "reopen_disk",
]

BLOCK_SIZE = DISK_BLOCK_SIZE
PATH_MAX_BYTES = 1024
MAP_MAGIC = int.from_bytes(b"LMDISK01", "little")
MAP_LAYOUT_VERSION = 1
MAP_HEADER_SIZE = PAGE_SIZE

_MAGIC, _VERSION, _INDEX, _SIZE, _BS, _NBLOCKS, _PATH_LEN, _NEXT_LEN = range(8)
_PATH_OFF = 1024
_NEXT_OFF = 2048
_MAP_NAME_RE = re.compile(r"(.+)\.d([0-9]+)")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def _check_block_size(block_size: int) -> int:
    if (isinstance(block_size, bool) or not isinstance(block_size, int)
            or block_size < PAGE_SIZE or block_size > (1 << 20) or block_size & (block_size - 1)):
        raise DiskError(f"block size must be a power of two in 4 KiB..1 MiB, got {block_size!r}")
    return block_size


def _check_size(size_bytes: int, block_size: int, what: str) -> int:
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes <= 0 \
            or size_bytes % block_size:
        raise DiskError(f"{what}: size must be a positive multiple of the {block_size}-byte block, "
                        f"got {size_bytes!r}")
    return size_bytes


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# the image file


class DiskImage:
    """An open raw image file: ``pread``/``pwrite`` by block, extents by
    SEEK_DATA/SEEK_HOLE, allocation by ``st_blocks``. Use :meth:`create` or
    :meth:`open`; close with :meth:`close` or ``with``."""

    def __init__(self, path: str, fd: int, size_bytes: int, block_size: int) -> None:
        # Private: use create()/open(). Takes ownership of fd.
        self.path = path
        self.fd = fd
        self.size_bytes = size_bytes
        self.block_size = block_size
        self.nblocks = size_bytes // block_size
        self._closed = False

    @classmethod
    def create(cls, path: str, size_bytes: int, *, block_size: int = BLOCK_SIZE) -> DiskImage:
        """Create ``path`` (exclusively, mode 0600) as a sparse file of
        ``size_bytes`` (every block a hole), fsync it and its directory.
        DiskError if it exists or cannot be made; nothing is left on failure."""
        _check_block_size(block_size)
        _check_size(size_bytes, block_size, f"disk image {path}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DiskError(f"cannot create disk image {path}: {exc}", errno=exc.errno) from exc
        try:
            os.ftruncate(fd, size_bytes)
            os.fsync(fd)
            _fsync_dir(path)
        except OSError as exc:
            os.close(fd)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            raise DiskError(f"cannot create disk image {path} of {size_bytes} bytes: {exc}",
                            errno=exc.errno) from exc
        return cls(path, fd, size_bytes, block_size)

    @classmethod
    def open(cls, path: str, *, readonly: bool = False, block_size: int = BLOCK_SIZE) -> DiskImage:
        """Open an existing image; its size (the virtual size) must be a
        positive multiple of ``block_size``. DiskError otherwise."""
        _check_block_size(block_size)
        try:
            fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskError(f"cannot open disk image {path}: {exc}", errno=exc.errno) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise DiskError(f"disk image {path} is not a regular file")
            _check_size(st.st_size, block_size, f"disk image {path}")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, st.st_size, block_size)

    # ---- geometry and allocation -----------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def allocated_bytes(self) -> int:
        """Bytes the filesystem holds for the file (``st_blocks`` x 512)."""
        return os.fstat(self.fd).st_blocks * 512

    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino): "same file?" on one host."""
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def data_extents(self, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """(offset, length) byte ranges of [start, end) that hold data, found
        with lseek(SEEK_DATA/SEEK_HOLE) without reading anything. Everything
        else reads as zero. A filesystem without hole tracking reports all
        of it as data (the kernel's generic answer), which is only slower."""
        end = self.size_bytes if end is None else min(end, self.size_bytes)
        out: list[tuple[int, int]] = []
        off = max(0, start)
        while off < end:
            try:
                data = os.lseek(self.fd, off, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise DiskError(f"lseek(SEEK_DATA) on {self.path}: {exc}", errno=exc.errno) from exc
            if data >= end:
                break
            try:
                hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            except OSError as exc:
                raise DiskError(f"lseek(SEEK_HOLE) on {self.path}: {exc}", errno=exc.errno) from exc
            hole = min(hole, end)
            out.append((data, hole - data))
            off = hole
        return out

    def data_blocks(self) -> list[PageRun]:
        """Runs of blocks (first, count) that hold data: the extents rounded
        out to whole blocks, merged."""
        bs = self.block_size
        runs: list[PageRun] = []
        for off, length in self.data_extents():
            first, last = off // bs, (off + length - 1) // bs
            if runs and first <= runs[-1].end:
                first = runs[-1].first
                runs[-1] = PageRun(first, max(runs[-1].end, last + 1) - first)
            else:
                runs.append(PageRun(first, last + 1 - first))
        return runs

    # ---- IO ---------------------------------------------------------------
    def _span(self, first: int, count: int) -> tuple[int, int]:
        if first < 0 or count < 0 or first + count > self.nblocks:
            raise ValueError(f"blocks [{first}, {first + count}) outside 0..{self.nblocks}")
        return first * self.block_size, count * self.block_size

    def read_blocks(self, first: int, count: int) -> bytes:
        """pread of blocks [first, first+count)."""
        buf = bytearray(self._span(first, count)[1])
        self.readinto_blocks(first, buf)
        return bytes(buf)

    def readinto_blocks(self, first: int, buf) -> None:
        """pread into ``buf`` (a writable buffer of whole blocks) from block ``first``."""
        view = memoryview(buf).cast("B")
        try:
            if len(view) % self.block_size:
                raise ValueError(f"buffer of {len(view)} bytes is not whole {self.block_size}-byte blocks")
            off, length = self._span(first, len(view) // self.block_size)
            done = 0
            while done < length:
                n = os.preadv(self.fd, [view[done:]], off + done)
                if n == 0:  # beyond EOF: cannot happen for a file of size_bytes; zero-fill
                    view[done:] = bytes(length - done)
                    break
                done += n
        except OSError as exc:
            raise DiskError(f"pread of {self.path}: {exc}", errno=exc.errno) from exc
        finally:
            view.release()

    def write_blocks(self, first: int, data) -> None:
        """pwrite ``data`` (whole blocks) at block ``first``."""
        view = memoryview(data).cast("B")
        try:
            if len(view) % self.block_size:
                raise ValueError(f"data of {len(view)} bytes is not whole {self.block_size}-byte blocks")
            off, length = self._span(first, len(view) // self.block_size)
            done = 0
            while done < length:
                done += os.pwrite(self.fd, view[done:], off + done)
        except OSError as exc:
            raise DiskError(f"pwrite of {self.path}: {exc}", errno=exc.errno) from exc
        finally:
            view.release()

    def punch_blocks(self, first: int, count: int) -> None:
        """Make blocks [first, first+count) holes again (they read as zero;
        fallocate PUNCH_HOLE|KEEP_SIZE). DiskError if the filesystem cannot."""
        off, length = self._span(first, count)
        if not length:
            return
        if _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, off, length) != 0:
            err = ctypes.get_errno()
            raise DiskError(f"cannot punch blocks [{first}, {first + count}) of {self.path}: "
                            f"{os.strerror(err)}", errno=err)

    def fsync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise DiskError(f"fsync of {self.path}: {exc}", errno=exc.errno) from exc

    def fdatasync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise DiskError(f"fdatasync of {self.path}: {exc}", errno=exc.errno) from exc

    def drop_cache(self) -> None:
        """POSIX_FADV_DONTNEED over the file: the next reads come from the
        device (read-back verification), and a bulk copy does not evict the
        host's page cache. Dirty pages are kept until written back."""
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> DiskImage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DiskImage {self.path!r} {self.size_bytes} bytes {'closed' if self._closed else self.fd}>"


# ---------------------------------------------------------------------------
# the disk map (shared memory)


def disk_map_name(segment: str, index: int) -> str:
    """Name of disk ``index``'s map for the RAM segment ``segment``: ``<segment>.d<index>``."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_DISKS:
        raise ValueError(f"disk index must be in 0..{MAX_DISKS - 1}, got {index!r}")
    name = f"{segment}.d{index}"
    segment_path(name)  # validates it
    return name


def parse_disk_map_name(name: str) -> tuple[str, int] | None:
    """(RAM segment, index) if ``name`` is a disk map's name, else None (for
    the agent's orphan scan: a map belongs to the segment it names)."""
    m = _MAP_NAME_RE.fullmatch(name)
    if m is None or int(m.group(2)) >= MAX_DISKS or str(int(m.group(2))) != m.group(2):
        return None
    return m.group(1), int(m.group(2))


def list_disk_maps(segment: str) -> list[str]:
    """Names of the disk maps of ``segment`` present in shm_dir(), by index."""
    found = []
    for name in list_segments(segment + ".d"):
        parsed = parse_disk_map_name(name)
        if parsed is not None and parsed[0] == segment:
            found.append((parsed[1], name))
    return [name for _, name in sorted(found)]


def unlink_disk_maps(segment: str) -> list[str]:
    """Remove every disk map of ``segment`` (not the images); returns their names."""
    removed = []
    for name in list_disk_maps(segment):
        try:
            os.unlink(segment_path(name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def _map_size(nblocks: int) -> int:
    return MAP_HEADER_SIZE + round_up(nblocks, PAGE_SIZE)


def _encode_path(path: str) -> bytes:
    if not isinstance(path, str) or not path:
        raise DiskError(f"disk path must be a non-empty str, got {path!r}")
    data = os.path.abspath(path).encode("utf-8", "surrogateescape")
    if len(data) > PATH_MAX_BYTES or b"\0" in data:
        raise DiskError(f"disk path {path!r} is longer than {PATH_MAX_BYTES} bytes or holds NUL")
    return data


class DiskMap:
    """An open, mapped disk map (header + dirty-block bytes). Use
    :meth:`create` or :meth:`attach`; :meth:`close` releases the views (a
    :meth:`collector` made from it stops working)."""

    def __init__(self, name: str, fd: int, mm: mmap.mmap) -> None:
        # Private: use create()/attach(). Takes ownership of fd and mm.
        self.name = name
        self.fd = fd
        self._mm = mm
        self._closed = False
        self._raw = memoryview(mm)[:MAP_HEADER_SIZE]
        self._q = self._raw.cast("Q")
        self.index = self._q[_INDEX]
        self.size_bytes = self._q[_SIZE]
        self.block_size = self._q[_BS]
        self.nblocks = self._q[_NBLOCKS]
        base = memoryview(mm)
        try:
            self.dirty: memoryview = base[MAP_HEADER_SIZE : MAP_HEADER_SIZE + self.nblocks]
        finally:
            base.release()

    @classmethod
    def create(cls, segment: str, index: int, path: str, size_bytes: int,
               block_size: int = BLOCK_SIZE) -> DiskMap:
        """Create ``<segment>.d<index>`` for an image of ``size_bytes`` at
        ``path``, all blocks clean. The whole map is allocated up front
        (SegmentError, errno ENOSPC, if shm_dir() cannot hold it: never a
        SIGBUS later). Removed again on any failure."""
        _check_block_size(block_size)
        _check_size(size_bytes, block_size, f"disk {index}")
        encoded = _encode_path(path)
        name = disk_map_name(segment, index)
        fpath = segment_path(name)
        nblocks = size_bytes // block_size
        total = _map_size(nblocks)
        try:
            fd = os.open(fpath, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DiskError(f"cannot create disk map {name!r}: {exc}", errno=exc.errno) from exc
        mm = None
        try:
            os.ftruncate(fd, total)
            reserve_file(fd, [(0, total)], f"cannot create disk map {name!r}", os.path.dirname(fpath))
            mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            q = memoryview(mm)[:MAP_HEADER_SIZE].cast("Q")
            try:
                q[_INDEX], q[_SIZE], q[_BS], q[_NBLOCKS] = index, size_bytes, block_size, nblocks
                q[_VERSION] = MAP_LAYOUT_VERSION
                q[_MAGIC] = MAP_MAGIC
            finally:
                q.release()
            self = cls(name, fd, mm)
            self._set_path(_PATH_LEN, _PATH_OFF, encoded)
            return self
        except BaseException as exc:
            undo_create(mm, fd, fpath)
            if isinstance(exc, OSError):
                raise DiskError(f"cannot create disk map {name!r}: {exc}", errno=exc.errno) from exc
            raise

    @classmethod
    def attach(cls, segment: str, index: int) -> DiskMap:
        """Map an existing disk map after checking magic, version, index and size."""
        name = disk_map_name(segment, index)
        fpath = segment_path(name)
        try:
            fd = os.open(fpath, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskError(f"cannot open disk map {name!r}: {exc}", errno=exc.errno) from exc
        mm = None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < MAP_HEADER_SIZE:
                raise DiskError(f"{fpath} is not a disk map ({st.st_size} bytes)")
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            q = memoryview(mm)[:64].cast("Q")
            try:
                magic, version, idx, size, bs, nblocks = (q[i] for i in range(6))
            finally:
                q.release()
            if magic != MAP_MAGIC:
                raise DiskError(f"{fpath} is not a livemig disk map (magic {magic:#x})")
            if version != MAP_LAYOUT_VERSION:
                raise DiskError(f"{fpath} has disk map version {version}, expected {MAP_LAYOUT_VERSION}")
            if idx != index or not bs or size != nblocks * bs or _map_size(nblocks) != st.st_size:
                raise DiskError(f"{fpath}: header (index {idx}, {size} bytes, {nblocks} blocks of {bs}) "
                                f"does not match the file ({st.st_size} bytes, index {index})")
            return cls(name, fd, mm)
        except BaseException as exc:
            if mm is not None:
                mm.close()
            os.close(fd)
            if isinstance(exc, OSError):
                raise DiskError(f"cannot attach disk map {name!r}: {exc}", errno=exc.errno) from exc
            raise

    # ---- paths --------------------------------------------------------------
    def _get_path(self, len_slot: int, off: int) -> str:
        n = self._q[len_slot]
        if n > PATH_MAX_BYTES:
            raise DiskError(f"disk map {self.name!r}: path length {n} exceeds {PATH_MAX_BYTES}")
        return bytes(self._raw[off : off + n]).decode("utf-8", "surrogateescape")

    def _set_path(self, len_slot: int, off: int, data: bytes) -> None:
        self._q[len_slot] = 0
        self._raw[off : off + PATH_MAX_BYTES] = data + bytes(PATH_MAX_BYTES - len(data))
        self._q[len_slot] = len(data)

    @property
    def path(self) -> str:
        """The image file the guest writes (absolute)."""
        return self._get_path(_PATH_LEN, _PATH_OFF)

    @property
    def next_path(self) -> str:
        """The path staged for the next REOPEN ("" if none yet)."""
        return self._get_path(_NEXT_LEN, _NEXT_OFF)

    def stage_path(self, path: str) -> None:
        """Agent: stage ``path`` for the next DiskCmd.REOPEN of this disk."""
        self._set_path(_NEXT_LEN, _NEXT_OFF, _encode_path(path))

    def commit_path(self, path: str) -> None:
        """Guest: record ``path`` as the file it now writes (after a reopen)."""
        self._set_path(_PATH_LEN, _PATH_OFF, _encode_path(path))

    # ---- dirty blocks -------------------------------------------------------
    def collector(self) -> DirtyMap:
        """A DirtyMap over the dirty-block bytes: collect() returns runs of
        block indexes and clears exactly those (see module doc)."""
        return DirtyMap(self.dirty)

    # ---- lifecycle ------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._q.release()
        self._raw.release()
        self.dirty.release()
        try:
            self._mm.close()
        except BufferError as exc:
            raise DiskError(f"disk map {self.name!r}: derived views still alive; release them first") from exc
        finally:
            os.close(self.fd)

    def unlink(self) -> None:
        try:
            os.unlink(segment_path(self.name))
        except FileNotFoundError:
            pass

    def __enter__(self) -> DiskMap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DiskMap {self.name!r} {self.nblocks} blocks of {self.block_size}>"


# ---------------------------------------------------------------------------
# the VM's disk table (agent side)


class DiskInfo(NamedTuple):
    index: int
    path: str
    size_bytes: int
    block_size: int
    nblocks: int
    map_name: str


def _info(dm: DiskMap) -> DiskInfo:
    return DiskInfo(dm.index, dm.path, dm.size_bytes, dm.block_size, dm.nblocks, dm.name)


def add_disk(ram: GuestRam, image_path: str, *, block_size: int = BLOCK_SIZE) -> DiskInfo:
    """Register the existing image at ``image_path`` (see DiskImage.create)
    as the VM's next disk: create its map ``<segment>.d<ndisks>``, then bump
    ``ndisks``. The guest must not be running (a paused guest opens the new
    disk when it resumes, a new one at start). DiskError/GuestError otherwise."""
    if ram.ctl.guest_state == GuestState.RUNNING:
        raise GuestError(f"cannot add a disk to {ram.name!r} while its guest runs; pause it first")
    index = ram.ctl.ndisks
    if index >= MAX_DISKS:
        raise DiskError(f"{ram.name!r} already has {MAX_DISKS} disks")
    with DiskImage.open(image_path, readonly=True, block_size=block_size) as img:
        size = img.size_bytes
    stale = segment_path(disk_map_name(ram.name, index))
    if os.path.exists(stale):  # left by a failed earlier add: not registered, so not in use
        os.unlink(stale)
    with DiskMap.create(ram.name, index, image_path, size, block_size) as dm:
        info = _info(dm)
    ram.ctl.ndisks = index + 1
    return info


def list_disks(ram: GuestRam) -> list[DiskInfo]:
    """The VM's disks, in index order (DiskError if a registered map is missing)."""
    out = []
    for i in range(ram.ctl.ndisks):
        with DiskMap.attach(ram.name, i) as dm:
            out.append(_info(dm))
    return out


def disk_sizes(ram: GuestRam) -> list[int]:
    """Sizes of the VM's disks (for workload.validate_for)."""
    return [d.size_bytes for d in list_disks(ram)]


def remove_disks(ram: GuestRam) -> list[str]:
    """Forget all disks of the VM (no guest may run): ndisks = 0, then the
    maps are unlinked. The image files are left alone (returns the map names)."""
    if ram.ctl.guest_state == GuestState.RUNNING:
        raise GuestError(f"cannot remove the disks of {ram.name!r} while its guest runs")
    ram.ctl.ndisks = 0
    return unlink_disk_maps(ram.name)


# ---------------------------------------------------------------------------
# disk IO commands (agent side; blocking polls of a few ms -- call from a
# thread, or use ControlBlock.disk_command / disk_acknowledged directly)


def _disk_command(ctl: ControlBlock, cmd: DiskCmd, index: int, timeout_s: float) -> float:
    t0 = time.monotonic()
    seq = ctl.disk_command(cmd, index)
    if not ctl.wait_disk_acknowledged(seq, timeout_s):
        raise DiskError(f"guest did not acknowledge disk {cmd.name} within {timeout_s} s")
    result = ctl.disk_result
    if result:
        raise DiskError(f"guest refused disk {cmd.name} of disk {index}: {os.strerror(result)}",
                        errno=result)
    return time.monotonic() - t0


def pause_disk_io(ctl: ControlBlock, timeout_s: float = 5.0) -> float:
    """Stop the guest's disk writes (RAM writes go on); returns once
    acknowledged (no write in flight), with the latency in seconds."""
    return _disk_command(ctl, DiskCmd.PAUSE, 0, timeout_s)


def resume_disk_io(ctl: ControlBlock, timeout_s: float = 5.0) -> float:
    """Resume the guest's disk writes (also after a FAILED disk IO state)."""
    return _disk_command(ctl, DiskCmd.RUN, 0, timeout_s)


def reopen_disk(ram: GuestRam, index: int, path: str, timeout_s: float = 5.0) -> float:
    """Switch the guest's disk ``index`` to the image at ``path`` (same
    virtual size). Pause the disk IO first. DiskError (errno set) if the
    guest could not open it: it keeps writing the old file then."""
    if not 0 <= index < ram.ctl.ndisks:
        raise DiskError(f"{ram.name!r} has no disk {index}")
    with DiskMap.attach(ram.name, index) as dm:
        with DiskImage.open(path, readonly=True, block_size=dm.block_size) as img:
            if img.size_bytes != dm.size_bytes:
                raise DiskError(f"{path} is {img.size_bytes} bytes, disk {index} is {dm.size_bytes}",
                                errno=errno.EINVAL)
        dm.stage_path(path)
    return _disk_command(ram.ctl, DiskCmd.REOPEN, index, timeout_s)

