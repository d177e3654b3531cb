"""Agent configuration: one frozen ``AgentConfig`` of sections.

``load_config(path, overrides)``: defaults <- TOML file <- overrides
(``{"section.key": value}``, from flags or ``--set``) -> validate. Unknown
keys are an error that suggests the closest known key.
"""
from __future__ import annotations

import dataclasses
import difflib
import grp
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping

from agent.errors import ConfigError


NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # agent, VM and prefix names; '.' separates them in shm names


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class AgentSection:
    name: str = "agent"
    listen: str = "127.0.0.1:0"          # migration endpoint (TCP)
    control: str = "/tmp/livemig.sock"   # control endpoint (Unix socket)
    control_mode: int = 0o600
    data_dir: str = "/var/lib/livemig"
    shm_prefix: str = "livemig"          # /dev/shm/<shm_prefix>.<agent>.<vm>.<id>

    def __post_init__(self) -> None:
        _check(NAME_RE.fullmatch(self.name) is not None, f"agent.name: {self.name!r} is not 1-64 of A-Z a-z 0-9 _ -")
        parse_hostport(self.listen)
        _check(bool(self.control), "agent.control: empty path")
        _check(0 <= self.control_mode <= 0o777, "agent.control_mode: not a file mode")
        _check(NAME_RE.fullmatch(self.shm_prefix) is not None, "agent.shm_prefix: 1-64 of A-Z a-z 0-9 _ -")


def auto_streams(cpus: int | None = None) -> int:
    """migration.streams = 0: one data stream per two cores, 1..4. Each end of
    a stream keeps about a core busy at full rate with TLS; on the 2-core
    reference machine (both agents on it) 1 stream measured 10 % faster than
    2 and 4 slower still (docs/BENCHMARK.md), so the guest and the event loop
    keep the rest."""
    n = (cpus if cpus is not None else os.cpu_count()) or 1
    return max(1, min(4, n // 2))


@dataclass(frozen=True, slots=True)
class MigrationSection:
    downtime_target_ms: int = 300
    max_rounds: int = 10
    max_bandwidth_mibps: int = 0         # 0 = unlimited
    handshake_timeout_s: float = 10.0
    io_timeout_s: float = 30.0           # no progress on a migration connection for this long = peer lost
    guest_ack_timeout_s: float = 5.0
    resolve_timeout_s: float = 30.0      # in-doubt resolution window after Resume was sent
    auth_key_file: str = ""              # shared secret: both agents must use the same key
    verify: str = "incremental"          # incremental | full: how memory is proven equal before resume
    switchover_timeout_ms: int = 0       # pause deadline; 0 = max(1000, 4 x downtime_target_ms)
    guest_heartbeat_timeout_s: float = 5.0   # a running guest whose heartbeat stops this long is dead
    streams: int = 0                     # data streams per migration, 1..8; 0 = auto (auto_streams)
    prefault: str = "ahead"              # destination memory: ahead (in the background) | setup (before Ready)

    def __post_init__(self) -> None:
        _check(self.verify in ("incremental", "full"), "migration.verify: incremental or full")
        _check(0 <= self.streams <= 8, "migration.streams: 0 (auto) or 1..8")
        _check(self.prefault in ("ahead", "setup"), "migration.prefault: ahead or setup")
        _check(0 <= self.switchover_timeout_ms <= 3_600_000, "migration.switchover_timeout_ms: 0..3600000")
        _check(self.guest_heartbeat_timeout_s > 0, "migration.guest_heartbeat_timeout_s: must be > 0")
        _check(1 <= self.downtime_target_ms <= 60_000, "migration.downtime_target_ms: 1..60000")
        _check(1 <= self.max_rounds <= 1000, "migration.max_rounds: 1..1000")
        _check(self.max_bandwidth_mibps >= 0, "migration.max_bandwidth_mibps: >= 0")
        for k in ("handshake_timeout_s", "io_timeout_s", "guest_ack_timeout_s", "resolve_timeout_s"):
            _check(getattr(self, k) > 0, f"migration.{k}: must be > 0")

    def data_streams(self) -> int:
        """The data streams this agent uses (or grants) per migration."""
        return self.streams or auto_streams()

    def switchover_deadline_s(self, downtime_target_ms: int) -> float:
        """How long a paused guest may wait for the switchover before it resumes here."""
        ms = self.switchover_timeout_ms or max(1000, 4 * downtime_target_ms)
        return ms / 1000.0


@dataclass(frozen=True, slots=True)
class LimitsSection:
    max_live_migrations: int = 2
    max_storage_migrations: int = 2
    max_connections: int = 64            # concurrent migration-endpoint connections
    max_guest_memory_mib: int = 0        # guest RAM this host may hold in all; 0 = what psutil says is free
    host_max_bandwidth_mibps: int = 0    # all outbound migrations of this host together; 0 = unlimited

    def __post_init__(self) -> None:
        _check(1 <= self.max_live_migrations <= 1024, "limits.max_live_migrations: 1..1024")
        _check(1 <= self.max_storage_migrations <= 1024, "limits.max_storage_migrations: 1..1024")
        _check(1 <= self.max_connections <= 4096, "limits.max_connections: 1..4096")
        _check(self.max_guest_memory_mib >= 0, "limits.max_guest_memory_mib: >= 0")
        _check(self.host_max_bandwidth_mibps >= 0, "limits.host_max_bandwidth_mibps: >= 0")


@dataclass(frozen=True, slots=True)
class LogSection:
    format: str = "auto"                 # auto | json | console
    level: str = "info"

    def __post_init__(self) -> None:
        _check(self.format in ("auto", "json", "console"), "log.format: auto, json or console")
        _check(self.level in ("debug", "info", "warning", "error"), "log.level: debug, info, warning or error")


SECURITY_MODES = ("tls", "insecure")
TLS_DIR = "/etc/livemig/tls"             # where `livemig cert issue NAME --ca DIR --out /etc/livemig/tls` writes


@dataclass(frozen=True, slots=True)
class SecuritySection:
    mode: str = "tls"                    # tls (mutual, TLS 1.3) | insecure (no TLS: lab only, warned at start)
    ca_file: str = f"{TLS_DIR}/ca.crt"   # the cluster CA: the only issuer trusted for peers
    cert_file: str = f"{TLS_DIR}/host.crt"   # this agent's certificate: its name must be agent.name
    key_file: str = f"{TLS_DIR}/host.key"
    max_handshakes: int = 16             # connections in the TLS/protocol handshake at once (oldest evicted)
    handshake_timeout_s: float = 5.0     # accept -> first request (Prepare/Query), TLS included

    def __post_init__(self) -> None:
        _check(self.mode in SECURITY_MODES, f"security.mode: tls or insecure, got {self.mode!r}")
        if self.mode == "tls":
            for k in ("ca_file", "cert_file", "key_file"):
                _check(bool(getattr(self, k)), f"security.{k}: empty path (needed with security.mode = \"tls\")")
        _check(1 <= self.max_handshakes <= 1024, "security.max_handshakes: 1..1024")
        _check(0 < self.handshake_timeout_s <= 300, "security.handshake_timeout_s: 0 < s <= 300")

    @property
    def tls(self) -> bool:
        return self.mode == "tls"


@dataclass(frozen=True, slots=True)
class ControlSection:
    group: str = ""                      # a group that may use the control socket (chown + 0660); "" = owner only

    def __post_init__(self) -> None:
        if self.group:
            try:
                grp.getgrnam(self.group)
            except KeyError:
                raise ConfigError(f"control.group: no group named {self.group!r} on this host") from None


@dataclass(frozen=True, slots=True)
class MetricsSection:
    listen: str = ""                     # Prometheus endpoint HOST:PORT (GET /metrics); "" = off. --metrics overrides

    def __post_init__(self) -> None:
        if self.listen:
            parse_hostport(self.listen)


@dataclass(frozen=True, slots=True)
class StorageSection:
    # Where this host sees another host's disk files, for shared-storage
    # migrations: "SRC_PREFIX=LOCAL_PREFIX[;SRC2=LOCAL2...]" (a source path
    # under SRC_PREFIX is opened here under LOCAL_PREFIX); "" = the same paths.
    shared_paths: str = ""

    def __post_init__(self) -> None:
        self.shared_map()

    def shared_map(self) -> list[tuple[str, str]]:
        out = []
        for item in filter(None, (x.strip() for x in self.shared_paths.split(";"))):
            src, sep, dst = item.partition("=")
            _check(bool(sep and src.strip() and dst.strip()), f"storage.shared_paths: expected SRC=DST, got {item!r}")
            out.append((os.path.normpath(src.strip()), os.path.normpath(dst.strip())))
        return out

    def local_path(self, path: str) -> str:
        """The path under which this host sees another host's file ``path``."""
        norm = os.path.normpath(path)
        for src, dst in self.shared_map():
            if norm == src or norm.startswith(src.rstrip("/") + "/"):
                return dst + norm[len(src):]
        return norm


@dataclass(frozen=True, slots=True)
class HostSection:
    # What this host offers VMs besides memory (agent/daemon/platform.py). Empty
    # cpu_* = the machine's own (/proc/cpuinfo); set them to present another CPU
    # (a lab simulating a heterogeneous cluster on one machine).
    cpu_vendor: str = ""
    cpu_flags: str = ""                  # space separated, e.g. "fpu sse sse2 ..."
    networks: str = ""                   # comma separated networks this host is connected to

    def __post_init__(self) -> None:
        for n in (x.strip() for x in self.networks.split(",")):
            _check(not n or NAME_RE.fullmatch(n) is not None, f"host.networks: {n!r} is not 1-64 of A-Z a-z 0-9 _ -")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    agent: AgentSection = field(default_factory=AgentSection)
    migration: MigrationSection = field(default_factory=MigrationSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    log: LogSection = field(default_factory=LogSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    control: ControlSection = field(default_factory=ControlSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    storage: StorageSection = field(default_factory=StorageSection)
    host: HostSection = field(default_factory=HostSection)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def auth_key(self) -> bytes | None:
        path = self.migration.auth_key_file
        if not path:
            return None
        try:
            with open(path, "rb") as f:
                key = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"migration.auth_key_file: {exc}") from exc
        _check(len(key) >= 16, "migration.auth_key_file: key shorter than 16 bytes")
        return key


_SECTIONS = {f.name: f.type for f in dataclasses.fields(AgentConfig)}
_SECTION_TYPES = {"agent": AgentSection, "migration": MigrationSection, "limits": LimitsSection, "log": LogSection,
                  "security": SecuritySection, "control": ControlSection, "metrics": MetricsSection,
                  "storage": StorageSection, "host": HostSection}


def _coerce(section: str, key: str, value: Any, typ: type) -> Any:
    where = f"{section}.{key}"
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type")  # pragma: no cover


def _field_types(cls: type) -> dict[str, type]:
    hints = {"int": int, "float": float, "str": str, "bool": bool}
    return {f.name: hints[f.type] if isinstance(f.type, str) else f.type for f in dataclasses.fields(cls)}


def _unknown(kind: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"unknown {kind} {name}{hint}")


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> AgentConfig:
    raw: dict[str, dict[str, Any]] = {name: {} for name in _SECTION_TYPES}
    if path is not None:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path}: {exc}") from exc
        for sec, body in doc.items():
            if sec not in _SECTION_TYPES:
                raise _unknown("section", sec, list(_SECTION_TYPES))
            if not isinstance(body, dict):
                raise ConfigError(f"[{sec}] must be a table")
            raw[sec].update(body)
    for dotted, value in (overrides or {}).items():
        sec, _, key = dotted.partition(".")
        if sec not in _SECTION_TYPES or not key:
            raise _unknown("key", dotted, [f"{s}.{k}" for s, c in _SECTION_TYPES.items() for k in _field_types(c)])
        raw[sec][key] = value
    sections = {}
    for sec, cls in _SECTION_TYPES.items():
        types = _field_types(cls)
        values = {}
        for key, value in raw[sec].items():
            if key not in types:
                raise _unknown("key", f"{sec}.{key}", [f"{sec}.{k}" for k in types])
            values[key] = _coerce(sec, key, value, types[key])
        try:
            sections[sec] = cls(**values)
        except TypeError as exc:  # pragma: no cover - guarded by the key check above
            raise ConfigError(str(exc)) from exc
    cfg = AgentConfig(**sections)
    if cfg.security.tls:                 # the files exist, load, chain to the CA and name this agent
        from agent.net.tls import check_credentials
        check_credentials(cfg.security, cfg.agent.name)
    return cfg
