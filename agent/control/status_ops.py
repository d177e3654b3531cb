"""Control handlers for the agent itself: ping, status, config.get, config.set.

``config.get`` answers the configuration the agent runs with (every section
as loaded, file paths but never a key's contents) and the run-time settings
``config.set`` can change (``SETTINGS``), with their current values."""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import psutil

from agent.errors import AgentError
from agent.migration.phases import MigrationPhase
from agent.observe.logs import get_logger

if TYPE_CHECKING:
    from agent.daemon.agent import Agent

log = get_logger("livemig.control.status")

LIMIT_KEYS = ("max_live_migrations", "max_storage_migrations")
#: The run-time settings (config set KEY VALUE): what each one is.
SETTINGS = {
    "max-live-migrations": "live migrations at once, inbound and outbound together (1..1024)",
    "max-storage-migrations": "storage moves at once on this host (1..1024)",
}


def agent_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("livemig")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def rss_anon_bytes() -> int:
    """RSS without mapped guest memory (shm pages count in rss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class StatusOps:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.host = agent.host
        self._security: dict | None = None

    def handlers(self) -> dict:
        return {"ping": self.ping, "status": self.status, "config.get": self.config_get,
                "config.set": self.config_set}

    async def ping(self, args: dict):
        return {"agent": self.host.name, "pid": os.getpid()}

    async def status(self, args: dict):
        h, ag = self.host, self.agent
        queued = [j for j in h.jobs.running() if j.phase is MigrationPhase.QUEUED]
        return {
            "agent": h.name,
            "version": agent_version(),
            "pid": os.getpid(),
            "listen": h.listen_addr,
            "metrics": ag.metrics_addr,
            "control": ag.cfg.agent.control,
            "vms": len(h.registry),
            "max_live_migrations": h.slots.limit,
            "max_storage_migrations": h.storage_limit,
            "live_migrations_running": h.slots.in_use,
            "live_migrations_queued": len(queued),
            "memory_available_bytes": h.memory_available(),
            "shm_free_bytes": h.shm_free_bytes(),
            "maintenance": h.maintenance,
            "shutting_down": ag.shutting_down,
            "uptime_s": round(time.time() - ag.started_at, 1),
            "rss_bytes": psutil.Process().memory_info().rss,
            "rss_anon_bytes": rss_anon_bytes(),
            "security": self.security(),
        }

    def security(self) -> dict:
        """How this agent authenticates peers, and its migration endpoint's handshake counters."""
        if self._security is None:
            cfg = self.agent.cfg
            sec = cfg.security
            info: dict = {"mode": sec.mode}
            if sec.tls:
                from agent.net.tls import TlsError, cert_info
                try:
                    c = cert_info(sec.cert_file)
                    info.update(certificate=c.name, issuer=c.issuer, not_after=c.not_after)
                except TlsError as exc:           # replaced on disk since start: say so, keep serving
                    info.update(certificate_error=str(exc))
                info.update(ca_file=sec.ca_file, cert_file=sec.cert_file)
            else:
                info["warning"] = "no TLS: the migration port accepts anyone, and migrations cross the network in clear"
            info["control_group"] = cfg.control.group or None
            self._security = info
        gate = getattr(self.agent.endpoint, "gate", None)
        return {**self._security, **(gate.snapshot() if gate is not None else {})}

    def _settings(self) -> dict:
        values = {"max-live-migrations": self.host.slots.limit, "max-storage-migrations": self.host.storage_limit}
        return {k: {"value": values[k], "help": v} for k, v in SETTINGS.items()}

    async def config_get(self, args: dict):
        key = args.get("key")
        doc = {"settings": self._settings(), "config": self.agent.cfg.as_dict()}
        if key is None:
            return doc
        if not isinstance(key, str):
            raise AgentError(f"config.get: key must be a string, got {key!r}")
        if key.replace("_", "-").removeprefix("limits.") in SETTINGS:
            k = key.replace("_", "-").removeprefix("limits.")
            return {"key": k, **doc["settings"][k]}
        section, _, name = key.partition(".")
        cfg = doc["config"]
        if section in cfg and name in cfg[section]:
            return {"key": key, "value": cfg[section][name]}
        raise AgentError(f"unknown setting {key!r}; run-time settings: {', '.join(SETTINGS)}; "
                         f"config keys: SECTION.KEY with SECTION one of {', '.join(cfg)}")

    async def config_set(self, args: dict):
        key, value = args["key"], args["value"]
        if not isinstance(key, str):
            raise AgentError(f"config.set: key must be a string, got {key!r}")
        key = key.replace("limits.", "").replace("-", "_")
        if key not in LIMIT_KEYS:
            raise AgentError(f"unknown or read-only setting {args['key']!r}; "
                             f"settings: {', '.join(SETTINGS)} (config get lists the rest)")
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise AgentError(f"{key}: expected an integer, got {value!r}") from None
        if not 1 <= n <= 1024:
            raise AgentError(f"{key}: 1..1024")
        if key == "max_live_migrations":
            self.host.slots.set_limit(n)
            self.host.pairs.wake_all()
        else:
            self.host.storage_limit = n
        log.info("limit_changed", key=key, value=n)
        return {key: n}
