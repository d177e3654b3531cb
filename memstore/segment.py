"""Guest RAM: one shared-memory file per VM at /dev/shm/<name>.

The file is opened with ``os.open`` and mapped with ``mmap`` -- not through
``multiprocessing.shared_memory``, whose resource tracker unlinks a segment
when a process that merely attached to it exits. A segment outlives every
process that maps it until someone calls :meth:`GuestRam.unlink` /
:func:`unlink_segment`.

Layout (as CRIU's page-pipe.h draws its buffers)::

    offset 0               4096                       ram_offset              file end
    | control page         | dirty map: 1 byte/page,  | guest RAM:             |
    | (ControlBlock)       | padded to a page multiple | npages * 4096 bytes    |

    ram_offset = PAGE_SIZE + round_up(npages, PAGE_SIZE)

Worked example, a 1 MiB VM (npages = 256)::

    [     0,   4096)  control page
    [  4096,   4352)  dirty map, byte i = page i (0 clean, non-zero dirty)
    [  4352,   8192)  padding (zero)
    [  8192, 1056768) RAM; page i at 8192 + i*4096      file size 1056768

and a 1 GiB VM (npages = 262144): dirty map [4096, 266240) = 64 pages,
ram_offset = 266240, file size 1073741824 + 266240. RAM starts on a page
boundary, so ``os.sendfile(sock, ram.fd, ram.file_offset(page), n*4096)`` and
``mmap.madvise`` work on page runs directly.

Views: ``ram``, ``dirty`` and ``ctl`` are memoryviews (ControlBlock wraps
one) over the mapping. :meth:`GuestRam.close` releases those, but a view the
caller derived (``page_view()``, slices of ``ram``) pins the mapping: release
it (``with ram.page_view(a, n) as v: ...`` or ``v.release()``) before close(),
otherwise close() raises SegmentError and the mapping lives on until the last
view is garbage-collected.

If /dev/shm runs out of space, touching an unbacked page of a mapping kills
the process with SIGBUS. create() allocates the header pages up front,
:meth:`GuestRam.reserve` allocates RAM pages with ``posix_fallocate`` (no
page is touched, so a full /dev/shm is a SegmentError with errno ENOSPC and
a message saying how much was needed and how much is free), and
:meth:`GuestRam.prefault` reserves before it maps anything. Call reserve()
or prefault() on segments that will be written by this host.

The directory is /dev/shm unless the environment variable LIVEMIG_SHM_DIR
names another one (tests use a small tmpfs of their own); :func:`shm_dir`
is the one place that decides, read on every call.
"""

from __future__ import annotations

import mmap
import errno
import gc
import os
import stat

from .control import LAYOUT_VERSION, MAGIC, ControlBlock
from .errors import SegmentError
from .layout import PAGE_SIZE, pages_for, round_up

__all__ = [
    "SHM_DIR",
    "SHM_DIR_ENV",
    "shm_dir",
    "MADV_POPULATE_WRITE",
    "GuestRam",
    "segment_path",
    "segment_exists",
    "list_segments",
    "unlink_segment",
    "ram_offset_for",
    "segment_size_for",
]

SHM_DIR = "/dev/shm"              # the default; use shm_dir()
SHM_DIR_ENV = "LIVEMIG_SHM_DIR"
MADV_POPULATE_WRITE = 23  # Linux >= 5.14; not exported by the mmap module in 3.11
_NAME_MAX = 255


PREFAULT_SLICE_BYTES = 16 * 2**20   # one madvise call: ~10 ms with the GIL held

def _check_name(name: str) -> str:
    if (
        not isinstance(name, str)
        or not name
        or len(name.encode("utf-8", "surrogateescape")) > _NAME_MAX
        or "/" in name
        or "\0" in name
        or name in {".", ".."}
    ):
        raise ValueError(f"invalid segment name {name!r}: need 1..{_NAME_MAX} bytes without '/' or NUL")
    return name


def shm_dir() -> str:
    """The directory holding the segments: $LIVEMIG_SHM_DIR if set and not
    empty, else /dev/shm. Read on every call (guests inherit it from the
    agent through launch_guest's environment)."""
    return os.environ.get(SHM_DIR_ENV) or SHM_DIR


def undo_create(mm: "mmap.mmap | None", fd: int, path: str) -> None:
    """Take back a shm file this process just created: unmap, close, unlink."""
    if mm is not None:
        try:
            mm.close()
        except BufferError:
            pass
    os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def segment_path(name: str) -> str:
    """<shm_dir()>/<name> (ValueError on a name that is not a plain file name)."""
    return os.path.join(shm_dir(), _check_name(name))


def segment_exists(name: str) -> bool:
    return os.path.exists(segment_path(name))


def list_segments(prefix: str) -> list[str]:
    """Sorted names of the files in shm_dir() that start with ``prefix``
    (disk maps, ``<segment>.d<i>``, included: see memstore.disk)."""
    return sorted(n for n in os.listdir(shm_dir()) if n.startswith(prefix))


def unlink_segment(name: str) -> bool:
    """Remove /dev/shm/<name>; True if it existed. Processes that map it keep
    their mapping; the memory is freed when the last one unmaps."""
    try:
        os.unlink(segment_path(name))
    except FileNotFoundError:
        return False
    return True


def ram_offset_for(npages: int) -> int:
    """Byte offset of guest RAM in the segment file."""
    return PAGE_SIZE + round_up(npages, PAGE_SIZE)


def segment_size_for(npages: int) -> int:
    """Total file size of a segment holding ``npages`` pages of RAM."""
    return ram_offset_for(npages) + npages * PAGE_SIZE


def _human_bytes(n: int) -> str:
    """1.0 GiB / 12.5 MiB / 512 KiB / 100 B: for error messages."""
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult:
            return f"{n / mult:.1f} {unit}"
    return f"{n} B"


def fs_free_bytes(path: str) -> int:
    """Bytes an unprivileged writer can still allocate on ``path``'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def reserve_file(fd: int, spans: list[tuple[int, int]], what: str, where: str) -> None:
    """posix_fallocate each (offset, length) span of ``fd``. On failure a
    SegmentError with the OS errno and, for ENOSPC, the bytes needed and the
    bytes free on ``where``'s filesystem. (Also used for disk maps.)"""
    for off, length in spans:
        try:
            os.posix_fallocate(fd, off, length)
        except OSError as exc:
            needed = sum(n for _, n in spans)
            try:
                free = _human_bytes(fs_free_bytes(where))
            except OSError:
                free = "unknown"
            if exc.errno == errno.ENOSPC:
                msg = f"{what}: needs {_human_bytes(needed)} in {where}, {free} free"
            else:
                msg = f"{what}: cannot allocate {_human_bytes(needed)} in {where}: {exc}"
            raise SegmentError(msg, errno=exc.errno) from exc


def _merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for off, length in sorted(spans):
        if merged and off <= merged[-1][0] + merged[-1][1]:
            last_off, last_len = merged[-1]
            merged[-1] = (last_off, max(last_len, off + length - last_off))
        else:
            merged.append((off, length))
    return merged


def _populate_write(mm: mmap.mmap, start: int, length: int) -> None:
    """MADV_POPULATE_WRITE over [start, start+length) (module level so tests
    can force the fallback)."""
    mm.madvise(MADV_POPULATE_WRITE, start, length)


class GuestRam:
    """An open, mapped segment. Use :meth:`create` or :meth:`attach`; close
    with :meth:`close` or ``with``; delete the file with :meth:`unlink`."""

    def __init__(self, name: str, fd: int, mm: mmap.mmap, npages: int) -> None:
        # Private: use create()/attach(). Takes ownership of fd and mm.
        self.name = name
        self.path = segment_path(name)
        self.fd = fd
        self.npages = npages
        self.size_bytes = npages * PAGE_SIZE
        self.ram_offset = ram_offset_for(npages)
        self._mm = mm
        self._closed = False
        base = memoryview(mm)
        try:
            self.ctl = ControlBlock(base[:PAGE_SIZE])
            self.dirty: memoryview = base[PAGE_SIZE : PAGE_SIZE + npages]
            self.ram: memoryview = base[self.ram_offset : self.ram_offset + self.size_bytes]
        finally:
            base.release()

    # ---- construction -----------------------------------------------------
    @classmethod
    def create(cls, name: str, size_bytes: int) -> GuestRam:
        """Create /dev/shm/<name> (exclusively, mode 0600) for ``size_bytes``
        of RAM, map it and write a fresh control header. SegmentError if it
        exists or cannot be set up; the file is removed on any failure."""
        try:
            path = segment_path(name)
            npages = pages_for(size_bytes)
        except ValueError as exc:
            raise SegmentError(f"cannot create segment {name!r}: {exc}") from None
        total = segment_size_for(npages)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise SegmentError(f"segment {name!r} already exists ({path})") from None
        except OSError as exc:
            raise SegmentError(f"cannot create segment {name!r}: {exc}") from exc
        mm = None
        try:
            os.ftruncate(fd, total)
            # Back the control page and dirty map now: a write to an unbacked
            # page of a full tmpfs is a SIGBUS, not an exception.
            reserve_file(fd, [(0, ram_offset_for(npages))],
                         f"cannot create segment {name!r}", os.path.dirname(path))
            mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self = cls(name, fd, mm, npages)
            self.ctl.init_header(npages)
            return self
        except BaseException as exc:
            undo_create(mm, fd, path)
            if isinstance(exc, OSError):
                raise SegmentError(f"cannot create segment {name!r} of {size_bytes} bytes: {exc}") from exc
            raise

    @classmethod
    def attach(cls, name: str) -> GuestRam:
        """Map an existing segment after checking magic, layout version and
        that the file size matches npages. SegmentError otherwise."""
        try:
            path = segment_path(name)
        except ValueError as exc:
            raise SegmentError(f"cannot attach segment: {exc}") from None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SegmentError(f"segment {name!r} does not exist ({path})") from None
        except OSError as exc:
            raise SegmentError(f"cannot open segment {name!r}: {exc}") from exc
        mm = None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SegmentError(f"{path} is not a regular file")
            if st.st_size < PAGE_SIZE:
                raise SegmentError(f"{path} is {st.st_size} bytes, too small for a segment")
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            header = memoryview(mm)[:24].cast("Q")
            try:
                magic, version, npages = header[0], header[1], header[2]
            finally:
                header.release()
            if magic != MAGIC:
                raise SegmentError(f"{path} is not a livemig segment (magic {magic:#x})")
            if version != LAYOUT_VERSION:
                raise SegmentError(f"{path} has layout version {version}, expected {LAYOUT_VERSION}")
            if npages == 0 or segment_size_for(npages) != st.st_size:
                raise SegmentError(
                    f"{path} is {st.st_size} bytes but its header says {npages} pages "
                    f"({segment_size_for(npages) if npages else 'invalid'} bytes)"
                )
            return cls(name, fd, mm, npages)
        except BaseException as exc:
            if mm is not None:
                mm.close()
            os.close(fd)
            if isinstance(exc, (OSError, ValueError)):
                raise SegmentError(f"cannot attach segment {name!r}: {exc}") from exc
            raise

    # ---- access -----------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def page_view(self, first: int, count: int) -> memoryview:
        """Writable view of pages [first, first+count). Release it before close()."""
        if first < 0 or count < 0 or first + count > self.npages:
            raise ValueError(f"pages [{first}, {first + count}) outside 0..{self.npages}")
        return self.ram[first * PAGE_SIZE : (first + count) * PAGE_SIZE]

    def file_offset(self, page: int) -> int:
        """Offset of ``page`` in the segment file (for os.sendfile / preadv)."""
        if not 0 <= page <= self.npages:
            raise ValueError(f"page {page} outside 0..{self.npages}")
        return self.ram_offset + page * PAGE_SIZE

    def next_data_page(self, page: int) -> int:
        """First page at or after ``page`` that the file holds (``npages`` if none).

        Pages before it are holes: never written, so zero, and reading them
        would allocate them (tmpfs fills a hole on a read fault), which costs
        more than sending them. ``lseek(SEEK_DATA)`` finds them without
        touching memory. A page the guest writes after this call is marked
        dirty, so the answer may be stale but never loses a write.
        """
        return self._seek_page(page, os.SEEK_DATA)

    def next_hole_page(self, page: int) -> int:
        """First page at or after ``page`` that is a hole (``npages`` if none):
        with next_data_page, lets a scan skip both kinds of extent in one call."""
        return self._seek_page(page, os.SEEK_HOLE)

    def _seek_page(self, page: int, whence: int) -> int:
        if not 0 <= page <= self.npages:
            raise ValueError(f"page {page} outside 0..{self.npages}")
        if page == self.npages:
            return page
        try:
            off = os.lseek(self.fd, self.ram_offset + page * PAGE_SIZE, whence)
        except OSError as exc:
            if exc.errno == errno.ENXIO:        # nothing of that kind after this offset
                return self.npages
            raise SegmentError(f"lseek({whence}) on {self.path}: {exc}") from exc
        return min(self.npages, max(page, (off - self.ram_offset) // PAGE_SIZE))

    def _spans(self, runs) -> list[tuple[int, int]]:
        """File byte spans of ``runs`` ((first, count) page pairs; None = all RAM)."""
        if runs is None:
            return [(self.ram_offset, self.size_bytes)]
        spans = []
        for first, count in runs:
            if first < 0 or count < 1 or first + count > self.npages:
                raise ValueError(f"pages [{first}, {first + count}) outside 0..{self.npages}")
            spans.append((self.ram_offset + first * PAGE_SIZE, count * PAGE_SIZE))
        return spans

    def reserve(self, runs=None) -> None:
        """Allocate the file pages behind every RAM page (or the pages of
        ``runs``, (first, count) pairs) with ``posix_fallocate``, without
        touching any of them, so that a later write through the mapping can
        no longer hit an unbacked page (SIGBUS on a full tmpfs).

        SegmentError with ``errno`` ENOSPC and a message such as "needs 1.0
        GiB in /dev/shm, 0.4 GiB free" when the directory cannot hold them
        (tmpfs gives back what a failed call allocated). Pages already
        allocated cost nothing; "needs" counts every page asked for."""
        spans = _merge_spans(self._spans(runs))
        where = os.path.dirname(self.path)
        reserve_file(self.fd, spans, f"cannot reserve RAM for segment {self.name!r}", where)

    def prefault(self, runs=None) -> None:
        """Make every RAM page (or the pages of ``runs``, (first, count) pairs) allocated, resident and writable in this
        mapping, so later writes (recv_into on the destination) take no page
        faults. First :meth:`reserve` (so a full /dev/shm is a SegmentError,
        errno ENOSPC, before any page is touched), then MADV_POPULATE_WRITE
        when the kernel has it; otherwise a write of one byte per page
        (rewriting each byte with its own value -- call this before a guest
        writes the segment).

        Measured on the 2-vCPU reference VM: ~0.58 s per GiB with
        MADV_POPULATE_WRITE, ~0.65-0.8 s per GiB with the fallback (the very
        first allocation of memory a fresh VM has never touched took 2.4 s
        per GiB: the hypervisor backs it on first use). Either is cheaper
        than taking the same faults inside recv_into during the first pass."""
        spans = self._spans(runs)
        self.reserve(runs)
        try:
            for off, size in spans:
                # In slices: madvise holds the GIL for the whole call (~0.6 s per
                # GiB); between slices other threads (an event loop) get to run.
                for o in range(off, off + size, PREFAULT_SLICE_BYTES):
                    _populate_write(self._mm, o, min(PREFAULT_SLICE_BYTES, off + size - o))
            return
        except OSError:
            pass
        step = 1 << 30  # fallback: a strided view per GiB touches one byte per page
        for off, size in spans:
            start = off - self.ram_offset
            for o in range(start, start + size, step):
                chunk = self.ram[o : min(o + step, start + size)]
                try:
                    touched = chunk[::PAGE_SIZE]
                    try:
                        touched[:] = touched.tobytes()
                    finally:
                        touched.release()
                finally:
                    chunk.release()

    # ---- lifecycle --------------------------------------------------------
    def close(self) -> None:
        """Release ram/dirty/ctl, unmap and close the fd (idempotent). Raises
        SegmentError if views derived by the caller still pin the mapping."""
        if self._closed:
            return
        self._closed = True
        self.ctl.release()
        self.dirty.release()
        self.ram.release()
        try:
            try:
                self._mm.close()
            except BufferError:
                gc.collect()        # views kept alive only by reference cycles (tracebacks)
                self._mm.close()
        except BufferError as exc:
            raise SegmentError(
                f"segment {self.name!r}: views derived from ram/page_view() are still alive; "
                "release them before close()"
            ) from exc
        finally:
            os.close(self.fd)

    def unlink(self) -> None:
        """Remove the /dev/shm file (idempotent; the mapping stays valid)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self.fd}"
        return f"<GuestRam {self.name!r} {self.npages} pages {state}>"
