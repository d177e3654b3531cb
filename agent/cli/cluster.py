"""A cluster view without a coordinator: the hosts the CLI knows, from a TOML file.

The file is ``$LIVEMIG_HOSTS``, else ``$XDG_CONFIG_HOME/livemig/hosts.toml``
(``~/.config/livemig/hosts.toml``)::

    default_port = 7700                  # optional: the port of a bare --to HOST

    [hosts.host-a]
    control = "/run/livemig/a.sock"      # its control socket (for --agent host-a, --all)
    address = "10.0.0.1:7700"            # its migration address (for --to host-a); the port may be left out

With it, ``--to host-a`` names a destination by host, ``--agent host-a`` an
agent, and ``vm list --all`` / ``jobs --all`` ask every host in turn (a
HOST column; a host that does not answer is named on stderr and the command
exits 1 after showing the others). Without it everything works by socket
path and HOST:PORT as before.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass

from agent.cli.exits import CliError

DEFAULT_PORT = 7700
HOST_KEYS = ("control", "address")


@dataclass(frozen=True)
class HostEntry:
    name: str
    control: str | None
    address: str | None


def hosts_path() -> str:
    if os.environ.get("LIVEMIG_HOSTS"):
        return os.environ["LIVEMIG_HOSTS"]
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "livemig", "hosts.toml")


class Cluster:
    def __init__(self, path: str, hosts: dict[str, HostEntry], default_port: int) -> None:
        self.path = path
        self.hosts = hosts
        self.default_port = default_port

    @classmethod
    def load(cls, path: str | None = None) -> "Cluster":
        """The hosts file (none: an empty cluster, unless ``$LIVEMIG_HOSTS`` names a missing file)."""
        explicit = path is not None or bool(os.environ.get("LIVEMIG_HOSTS"))
        path = path or hosts_path()
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            if explicit:
                raise CliError(f"hosts file {path} (LIVEMIG_HOSTS): no such file") from None
            return cls(path, {}, DEFAULT_PORT)
        except tomllib.TOMLDecodeError as exc:
            raise CliError(f"hosts file {path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise CliError(f"hosts file {path}: {exc.strerror or exc}") from None
        return cls.parse(path, doc)

    @classmethod
    def parse(cls, path: str, doc: dict) -> "Cluster":
        def bad(key: str, why: str) -> CliError:
            return CliError(f"hosts file {path}: {key}: {why}")

        unknown = set(doc) - {"default_port", "hosts"}
        if unknown:
            raise bad(sorted(unknown)[0], "unknown key (expected default_port and [hosts.NAME] tables)")
        port = doc.get("default_port", DEFAULT_PORT)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise bad("default_port", f"a port 1..65535, got {port!r}")
        hosts: dict[str, HostEntry] = {}
        table = doc.get("hosts", {})
        if not isinstance(table, dict):
            raise bad("hosts", "expected [hosts.NAME] tables")
        for name, entry in table.items():
            if not isinstance(entry, dict):
                raise bad(f"hosts.{name}", "expected a table with control and/or address")
            extra = set(entry) - set(HOST_KEYS)
            if extra:
                raise bad(f"hosts.{name}.{sorted(extra)[0]}", f"unknown key (expected {' and '.join(HOST_KEYS)})")
            for k in HOST_KEYS:
                if k in entry and (not isinstance(entry[k], str) or not entry[k]):
                    raise bad(f"hosts.{name}.{k}", f"expected a non-empty string, got {entry[k]!r}")
            if not entry:
                raise bad(f"hosts.{name}", "needs control and/or address")
            address = entry.get("address")
            if address is not None and not _has_port(address):
                address = f"{address}:{port}"
            control = os.path.expanduser(entry["control"]) if "control" in entry else None
            hosts[name] = HostEntry(name, control, address)
        return cls(path, hosts, port)

    def target(self, to: str) -> str:
        """``--to``: a host name from the file, HOST (the default port) or HOST:PORT."""
        if to in self.hosts:
            entry = self.hosts[to]
            if entry.address is None:
                raise CliError(f"hosts file {self.path}: hosts.{to} has no address (where its agent listens)")
            return entry.address
        return to if _has_port(to) else f"{to}:{self.default_port}"

    def agent(self, agent: str | None) -> str | None:
        """``--agent``: a host name from the file, else the socket path as given."""
        if agent and agent in self.hosts and "/" not in agent:
            entry = self.hosts[agent]
            if entry.control is None:
                raise CliError(f"hosts file {self.path}: hosts.{agent} has no control (its control socket)")
            return entry.control
        return agent

    def controls(self) -> list[HostEntry]:
        """The hosts with a control socket, in file order (``--all``)."""
        out = [h for h in self.hosts.values() if h.control]
        if not out:
            raise CliError(f"--all: no hosts with a control socket in {self.path} "
                           f"(see 'livemig hosts --help' for the file's format)")
        return out


def _has_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    if text.startswith("[") and text.endswith("]"):
        return False                       # a bare IPv6 address in brackets
    return bool(sep) and port.isdigit() and bool(host) and (host.startswith("[") or ":" not in host)
