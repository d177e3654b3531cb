"""One vocabulary for what the CLI prints: sizes in binary units, bandwidth in MiB/s, times as
ISO 8601 or relative, durations in ms/s/min, yes/no and "-" instead of Python's True/False/None.

Human output goes through ``human(key, value)`` (the key's suffix says the unit:
``_bytes``, ``_bps``, ``_mibps``, ``_pps``, ``_ms``, ``_s``, ``_at``, ``_pct``);
JSON output keeps the numbers and gains an ISO 8601 twin for every timestamp
(``with_iso``: ``"finished_at": 1717.., "finished_at_iso": "2024-..."``).
"""
from __future__ import annotations

import datetime as _dt
import re
import time
from typing import Any

MIB = 2**20
PAGE_BYTES = 4096


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_mibps(bytes_per_s: float) -> str:
    """A bandwidth, always in MiB/s (the unit of --max-bandwidth)."""
    v = bytes_per_s / MIB
    return f"{v:.1f} MiB/s" if v < 100 else f"{v:.0f} MiB/s"


def fmt_duration(seconds: float) -> str:
    s = abs(seconds)
    if s < 1:
        return f"{seconds * 1000:.0f} ms"
    if s < 60:
        return f"{seconds:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    if s < 86400:
        return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
    return f"{int(s // 86400)} d {int(s % 86400 // 3600)} h"


def fmt_ms(ms: float) -> str:
    return f"{ms:.1f} ms" if ms < 10_000 else fmt_duration(ms / 1000)


def iso(ts: float) -> str:
    """ISO 8601 in local time with its offset, to the second."""
    return _dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def ago(ts: float, now: float | None = None) -> str:
    d = (time.time() if now is None else now) - ts
    if -1 < d < 1:
        return "now"
    return f"{fmt_duration(d)} ago" if d > 0 else f"in {fmt_duration(-d)}"


def fmt_time(ts: float, now: float | None = None) -> str:
    return f"{iso(ts)} ({ago(ts, now)})"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def human(key: str, value: Any, *, short: bool = False) -> str:
    """``value`` as a person reads it, its unit taken from ``key``'s suffix (``short``: for table cells)."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k} {human(k, v, short=True)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(human(key, v, short=True) for v in value) or "-"
    if _is_number(value):
        if key.endswith("_mode") and isinstance(value, int):
            return f"{value:04o}"
        if key.endswith("_bytes"):
            return fmt_bytes(value)
        if key.endswith("_at"):
            return ago(value) if short else fmt_time(value)
        if key.endswith("_bps"):
            return fmt_mibps(value)
        if key.endswith("_mibps"):
            return "unlimited" if value == 0 else f"{value} MiB/s"
        if key.endswith("_pps"):
            return f"{value:.0f} pages/s"
        if key.endswith("_wps"):
            return f"{value:.0f} writes/s"
        if key.endswith("_ms"):
            return fmt_ms(value)
        if key.endswith("_s"):
            return fmt_duration(value)
        if key.endswith("_pct"):
            return f"{value:g}%"
        if isinstance(value, float):
            return f"{value:g}"
    return str(value)


def with_iso(obj: Any) -> Any:
    """A copy of ``obj`` (JSON data) where every numeric ``*_at`` key has an ``*_at_iso`` twin next to it."""
    if isinstance(obj, list):
        return [with_iso(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out: dict = {}
    for k, v in obj.items():
        out[k] = with_iso(v)
        if isinstance(k, str) and k.endswith("_at") and _is_number(v) and f"{k}_iso" not in obj:
            out[f"{k}_iso"] = iso(v)
    return out


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)?\s*$")
_SECONDS = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: a duration back from now (``90s``, ``15m``, ``1h``, ``2d``) or an ISO 8601 time -> Unix time."""
    m = _DURATION.match(text)
    now = time.time() if now is None else now
    if m:
        return now - float(m.group(1)) * _SECONDS[m.group(2)]
    try:
        t = _dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected a duration (30s, 15m, 1h, 2d) or an ISO 8601 time, got {text!r}") from None
    return (t if t.tzinfo else t.astimezone()).timestamp()
