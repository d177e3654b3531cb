"""Host: the small owners one agent is made of, passed explicitly to drivers.

``InstanceLock`` is what makes an agent the only one of its kind: taken
before the agent touches anything (see ``InstanceLock``).
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass, field

import psutil

from memstore import segment_path
from protocol import FEATURES, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Capabilities

from agent.daemon.config import AgentConfig
from agent.errors import AgentError
from agent.migration.jobs import JobTable
from agent.daemon.registry import VmRegistry
from agent.migration.scheduler import HostBandwidth, LiveSlots, PairLimits, StorageSlots


MEMORY_HEADROOM_BYTES = 256 * 2**20     # kept free for the host itself


@dataclass
class Host:
    cfg: AgentConfig
    registry: VmRegistry
    jobs: JobTable = field(default_factory=JobTable)
    slots: LiveSlots | None = None
    auth_key: bytes | None = None
    maintenance: bool = False
    listen_addr: str = ""

    def __post_init__(self) -> None:
        if self.slots is None:
            self.slots = LiveSlots(self.cfg.limits.max_live_migrations)
        self.pairs = PairLimits(self.slots)
        self.prefault_lock = asyncio.Lock()
        #: migration id -> its InboundStreams, while it waits for / holds data streams
        self.inbound_streams: dict = {}
        self._load_taken()
        bw = self.cfg.limits.host_max_bandwidth_mibps
        self.bandwidth = HostBandwidth(bw) if bw else None
        self.storage_slots = StorageSlots(self.cfg.limits.max_storage_migrations)
        self.guest_log_dir = self.registry.guest_log_dir

    @property
    def name(self) -> str:
        return self.cfg.agent.name

    @property
    def storage_limit(self) -> int:
        """Storage moves at once on this host (``config set max-storage-migrations``)."""
        return self.storage_slots.limit

    @storage_limit.setter
    def storage_limit(self, n: int) -> None:
        self.storage_slots.set_limit(n)         # a raised limit lets queued moves go at once

    def capabilities(self) -> Capabilities:
        return Capabilities(
            version_min=MIN_PROTOCOL_VERSION,
            version_max=PROTOCOL_VERSION,
            features=FEATURES,
            max_live_migrations=self.slots.limit,
        )

    @staticmethod
    def shm_dir() -> str:
        """Where segments live (memstore's path helper: /dev/shm unless memstore says otherwise)."""
        return os.path.dirname(segment_path("x"))

    def shm_free_bytes(self) -> int:
        """Free space of the shm file system, as an unprivileged writer sees it."""
        st = os.statvfs(self.shm_dir())
        return st.f_bavail * st.f_frsize

    def memory_available(self) -> int:
        """Guest RAM this host can still take: free memory (psutil) less the
        inbound reservations and a headroom for the host itself, bounded by
        the shm file system's free space less the reservations, and capped
        by limits.max_guest_memory_mib less what its VMs already hold."""
        reg = self.registry
        reserved = sum(reg.reserved.values())
        free = psutil.virtual_memory().available - reserved - MEMORY_HEADROOM_BYTES
        free = min(free, self.shm_free_bytes() - reserved)
        cap_mib = self.cfg.limits.max_guest_memory_mib
        if cap_mib:
            free = min(free, cap_mib * 2**20 - reg.committed_memory())
        return max(free, 0)

    # ---- migrations this host took ownership of (answers in-doubt queries) ----
    TAKEN_KEEP = 4096

    def _taken_path(self) -> str:
        return os.path.join(self.cfg.agent.data_dir, "taken-migrations")

    def taken(self, migration_id: str) -> None:
        """Record, durably, that this host owns the VM of ``migration_id`` (from Resume on)."""
        with open(self._taken_path(), "a") as f:
            f.write(migration_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._taken.add(migration_id)         # only once it is durable

    def untake(self, migration_id: str) -> None:
        self._taken.discard(migration_id)
        tmp = self._taken_path() + ".tmp"
        with open(self._taken_path()) as f:
            ids = [line.strip() for line in f if line.strip() and line.strip() != migration_id]
        with open(tmp, "w") as f:
            f.write("".join(i + "\n" for i in ids))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._taken_path())

    def was_taken(self, migration_id: str) -> bool:
        return migration_id in self._taken

    def _load_taken(self) -> None:
        try:
            with open(self._taken_path()) as f:
                ids = [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            ids = []
        ids = ids[-self.TAKEN_KEEP:]
        self._taken = set(ids)
        tmp = self._taken_path() + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(i + "\n" for i in ids))
            f.flush()
            os.fsync(f.fileno())          # a power loss must not leave it empty: it answers queries
        os.replace(tmp, self._taken_path())

    def guest_log(self, vm: str) -> str:
        return self.registry.guest_log(vm)


# ---- one agent per data dir, identity and control socket ---------------------
def _peer_pid(sock: socket.socket) -> int | None:
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid or None
    except OSError:
        return None


def _pid_text(pid: int | None) -> str:
    return f"pid {pid}" if pid else "pid unknown"


class InstanceLock:
    """The exclusive claims of one agent, taken before it touches anything.

    - ``<data_dir>/lock``: flock (the file holds the owner's pid);
    - the identity ``<shm_prefix>.<name>``: an abstract-namespace Unix socket
      ``\\0livemig.<shm_prefix>.<name>`` (two agents with one name would sweep
      each other's segments; an abstract name leaves nothing behind, even
      after SIGKILL; note that it is per network namespace);
    - the control socket: flock ``<control>.lock``, and refused if anything
      answers on the socket already (the socket of a live agent is never
      unlinked).

    ``acquire()`` raises AgentError naming what is taken and by which pid.
    """

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self._data_fd: int | None = None
        self._control_fd: int | None = None
        self._identity: socket.socket | None = None

    def acquire(self) -> "InstanceLock":
        a = self.cfg.agent
        try:
            self._data_fd = _flock(os.path.join(a.data_dir, "lock"), f"data dir {a.data_dir}")
            self._identity = _bind_identity(a.shm_prefix, a.name)
            os.makedirs(os.path.dirname(os.path.abspath(a.control)), exist_ok=True)
            self._control_fd = _flock(a.control + ".lock", f"control socket {a.control}")
            _refuse_if_answering(a.control)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self._control_fd is not None:
            _unlink_if_same(self.cfg.agent.control + ".lock", self._control_fd)   # while held: no race
            os.close(self._control_fd)
            self._control_fd = None
        if self._data_fd is not None:
            os.close(self._data_fd)          # the lock file stays: it is part of the data dir
            self._data_fd = None
        if self._identity is not None:
            self._identity.close()
            self._identity = None


def _flock(path: str, what: str) -> int:
    """An exclusive, non-blocking flock on ``path`` (created), with our pid in it."""
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise AgentError(f"another agent already uses {what} ({_pid_text(pid)})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:                 # unlinked by its last owner between open and flock: again
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd
    raise AgentError(f"cannot lock {what}: {path} keeps changing")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except (OSError, UnicodeDecodeError):
        return None


def _unlink_if_same(path: str, fd: int) -> None:
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _bind_identity(shm_prefix: str, name: str) -> socket.socket:
    address = f"\0livemig.{shm_prefix}.{name}".encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind(address)
        s.listen(16)
        return s
    except OSError as exc:
        s.close()
        if exc.errno != errno.EADDRINUSE:
            raise
    pid = _pid_of_listener(address)
    raise AgentError(f"another agent already runs as {name} with shm prefix {shm_prefix} ({_pid_text(pid)}); "
                     f"it owns the segments {shm_prefix}.{name}.*")


def _pid_of_listener(address: str | bytes) -> int | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as c:
        c.settimeout(0.5)
        try:
            c.connect(address)
        except OSError:
            return None
        return _peer_pid(c)


def _refuse_if_answering(path: str) -> None:
    """Something listens on ``path`` already (an agent without these locks, or not an agent)."""
    if not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as c:
        c.settimeout(0.5)
        try:
            c.connect(path)
        except OSError:
            return                   # a stale socket file: the control server replaces it
        pid = _peer_pid(c)
    raise AgentError(f"another agent already uses control socket {path} ({_pid_text(pid)})")
