"""Host: the small owners one agent is made of, passed explicitly to drivers."""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

import psutil

from protocol import FEATURES, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Capabilities

from agent.daemon.config import AgentConfig
from agent.migration.jobs import JobTable
from agent.daemon.registry import VmRegistry
from agent.migration.scheduler import HostBandwidth, LiveSlots, PairLimits


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
        self._load_taken()
        bw = self.cfg.limits.host_max_bandwidth_mibps
        self.bandwidth = HostBandwidth(bw) if bw else None
        self.storage_limit = self.cfg.limits.max_storage_migrations
        self.guest_log_dir = os.path.join(self.cfg.agent.data_dir, "guests")
        os.makedirs(self.guest_log_dir, mode=0o700, exist_ok=True)

    @property
    def name(self) -> str:
        return self.cfg.agent.name

    def capabilities(self) -> Capabilities:
        return Capabilities(
            version_min=MIN_PROTOCOL_VERSION,
            version_max=PROTOCOL_VERSION,
            features=FEATURES,
            max_live_migrations=self.slots.limit,
        )

    def memory_available(self) -> int:
        """Guest RAM this host can still take: free memory (psutil) less the
        inbound reservations and a headroom for the host itself, capped by
        limits.max_guest_memory_mib less what its VMs already hold."""
        reg = self.registry
        free = psutil.virtual_memory().available - sum(reg.reserved.values()) - MEMORY_HEADROOM_BYTES
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
        self._taken.add(migration_id)
        with open(self._taken_path(), "a") as f:
            f.write(migration_id + "\n")
            f.flush()
            os.fsync(f.fileno())

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
        os.replace(tmp, self._taken_path())

    def guest_log(self, vm: str) -> str:
        return os.path.join(self.guest_log_dir, f"{vm}.log")
