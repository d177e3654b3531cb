"""``livemig agent``: the endpoints checked before the daemon starts, so the usual start-up
mistakes are one line that names the flag and the key and says the likely cause
("address in use: is another agent running?") instead of a log record.

The daemon still binds for real (and refuses a second agent with its locks);
this only turns the common failures into a clear message first.
"""
from __future__ import annotations

import errno
import os
import socket

from agent.cli.exits import CliError


def _tcp(what: str, addr: str) -> None:
    from agent.daemon.config import parse_hostport

    host, port = parse_hostport(addr)
    if port == 0:
        return                                   # ephemeral: cannot be taken
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CliError(f"{what} {addr}: cannot resolve {host!r} ({exc.strerror})") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)      # as the daemon's listener does
        try:
            s.bind(sockaddr)
        except OSError as exc:
            raise CliError(f"{what} {addr}: {_why(exc, port)}") from None


def _why(exc: OSError, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"address in use: is another agent running? (or another program on port {port}; choose another port)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no interface of this host has that address (use one of its addresses, or 0.0.0.0)"
    if exc.errno == errno.EACCES:
        return f"permission denied: port {port} needs root or CAP_NET_BIND_SERVICE (use a port >= 1024)"
    return exc.strerror or str(exc)


def _control(what: str, path: str) -> None:
    if os.path.exists(path):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(path)
            except OSError:
                return                           # a stale socket file: the daemon replaces it
        raise CliError(f"{what} {path}: an agent answers there already: is another agent running? "
                       f"(stop it, or give this one its own --control)")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(parent) and not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{what} {path}: directory {parent} is not writable by this user")


def check_endpoints(cfg, metrics: str | None) -> None:
    """Raise CliError for a listen/metrics address this host cannot bind, or a control socket in use."""
    _control("agent.control (--control)", cfg.agent.control)
    _tcp("agent.listen (--listen)", cfg.agent.listen)
    if metrics:
        _tcp("--metrics", metrics)
    elif getattr(getattr(cfg, "metrics", None), "listen", ""):
        _tcp("metrics.listen", cfg.metrics.listen)
