"""systemd notify protocol, stdlib only (cf. sd_notify(3), sd_watchdog_enabled(3)).

``notify("READY=1")`` sends one datagram to ``$NOTIFY_SOCKET`` (a path, or an
abstract name written ``@name``). Without ``$NOTIFY_SOCKET`` (not run by
systemd, or ``Type=simple``) every call is a no-op that returns ``False``;
a send error is reported as ``False`` too, never raised: notification is
best effort and must not take the agent down.

Wiring (daemon): ``ready()`` once the migration endpoint and the control
socket accept connections; ``stopping()`` when shutdown begins; a
``watchdog_loop(interval)`` task when ``watchdog_interval_s()`` is not None.
"""
from __future__ import annotations

import asyncio
import os
import socket

__all__ = ["notify", "ready", "stopping", "reloading", "watchdog", "status",
           "watchdog_interval_s", "watchdog_loop"]


def _address(raw: str) -> str | bytes | None:
    if not raw:
        return None
    if raw[0] == "@":                     # abstract namespace: leading NUL byte
        return b"\0" + raw[1:].encode()
    if raw[0] == "/":
        return raw
    return None                           # vsock:... and relative paths are not supported


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, newline-separated assignments) to systemd.

    Returns True if the datagram was sent, False if there is no
    ``$NOTIFY_SOCKET`` or sending failed.
    """
    addr = _address(os.environ.get("NOTIFY_SOCKET", ""))
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


def ready() -> bool:
    """The service is up: both endpoints accept connections."""
    return notify("READY=1")


def stopping() -> bool:
    """Shutdown has begun (systemd then waits up to TimeoutStopSec)."""
    return notify("STOPPING=1")


def reloading() -> bool:
    return notify("RELOADING=1")


def watchdog() -> bool:
    """Keep-alive ping for ``WatchdogSec=``."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """Free-form status line shown by ``systemctl status`` (one line)."""
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog_interval_s() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, or None when the watchdog is off for us.

    As in sd_watchdog_enabled(3): ``$WATCHDOG_PID``, when set, must be this
    process (otherwise the variables were meant for a parent).
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    if pid:
        if not pid.isdigit() or int(pid) != os.getpid():
            return None
    return int(usec) / 1e6 / 2


async def watchdog_loop(interval_s: float) -> None:
    """Ping ``WATCHDOG=1`` every ``interval_s`` until cancelled.

    Runs on the event loop on purpose: if the loop is stuck, the pings
    stop and systemd restarts the agent, which is what the watchdog is for.
    """
    if interval_s <= 0:
        raise ValueError("interval_s must be > 0")
    while True:
        watchdog()
        await asyncio.sleep(interval_s)
