"""What the CLI prints: tables, migration reports, progress bars, and errors (text or JSON)."""
from __future__ import annotations

import json
import sys
from typing import Any

FINAL_STATES = ("completed", "failed", "cancelled")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) if r.get(c) is not None else "-" for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def key_values(obj: dict, width: int) -> str:
    return "\n".join(f"{k:{width}} {v}" for k, v in obj.items())


def vm_rows(vms: list[dict]) -> list[dict]:
    """``vm list`` rows with the disk columns: how many disks, their virtual size, disk writes."""
    rows = []
    for v in vms:
        disks = v.get("disks") or []
        rows.append({**v, "disks": len(disks),
                     "disk_bytes": fmt_bytes(sum(d["size_bytes"] for d in disks)) if disks else "-"})
    return rows


def format_vm(r: dict) -> str:
    """``vm show``: the VM's fields, then one line per disk."""
    lines = [key_values({k: v for k, v in r.items() if k != "disks"}, 16)]
    disks = r.get("disks") or []
    lines.append(f"{'disks':16} {len(disks) or '-'}")
    for d in disks:
        alloc = d.get("allocated_bytes")
        lines.append(f"  {d['name']:<12} {fmt_bytes(d['size_bytes']):>10}  allocated "
                     f"{fmt_bytes(alloc) if alloc is not None else '?':>10}  {d['path']}"
                     + ("  (attached)" if d.get("attached") else "") + (f"  [{d['error']}]" if d.get("error") else ""))
    return "\n".join(lines)


def format_report(r: dict) -> str:
    lines = [
        f"migration {r['id']}: {r['vm']} {r['source']} -> {r['destination']}",
        f"  status        {r['status']}" + (f"  ({r['error']})" if r.get("error") else ""),
        f"  verified      {'yes' if r['verified'] else 'no'}",
        f"  total         {r['total_ms']:.1f} ms",
        f"  downtime      {r['downtime_ms']:.1f} ms",
        f"  iterations    {r['iterations']}  (convergence: {r.get('convergence') or '-'})",
        f"  pages sent    {r['pages_sent']} of {r['pages_total']}  (+{r['zero_pages']} zero pages announced)",
        f"  bytes sent    {r['bytes_sent']} ({fmt_bytes(r['bytes_sent'])}), {r.get('throughput_gibps', 0):.2f} GiB/s",
        f"  guest rate    {r.get('guest_rate_before_pps', 0)} pages/s before, {r.get('guest_rate_during_pps', 0)} during"
        f" (throttle {r.get('throttle_pct', 0)}%)",
        f"  guest writes  {r.get('writes_at_pause', 0)} at pause, {r.get('writes_after_resume', 0)} at resume",
        "  phases (ms)   " + ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items()),
    ]
    for rd in r.get("rounds", []):
        lines.append(f"    round {rd['round']:>2}: {rd['pages_sent']:>7} pages in {rd['ms']:>8.1f} ms,"
                     f" {rd['bandwidth_bps'] / 2**30:6.2f} GiB/s, {rd['dirty_pages']:>6} dirty after")
    return "\n".join(lines)


def format_drain(r: dict) -> str:
    lines = [f"drain {r['status']} in {r['drain_ms']:.0f} ms",
             table(r["vms"], ["vm", "destination", "status", "verified", "total_ms", "downtime_ms", "error"])]
    if r["vms_left"]:
        lines.append(f"left on this host: {', '.join(r['vms_left'])}")
    return "\n".join(lines)


def bar(frac: float, width: int = 24) -> str:
    frac = min(max(frac, 0.0), 1.0)
    full = int(frac * width)
    return "[" + "#" * full + "." * (width - full) + "]"


def format_progress(j: dict) -> str:
    total = j.get("pages_total") or 0
    done = j.get("pages_sent", 0)
    final = j["state"] in FINAL_STATES
    frac = j.get("progress_pct", 0.0) / 100.0 if "progress_pct" in j else (min(done / total, 1.0) if total else 0.0)
    bw = j.get("bandwidth_bps") or 0
    eta = j.get("eta_s")
    extra = (f" round {j.get('round', 0)} {bw / 2**20:7.1f} MiB/s dirty {j.get('dirty_rate_pps', 0)}/s"
             + (f" eta {eta:.1f}s" if eta is not None and not final else ""))
    why = f" ({j['error']})" if j.get("error") else (f" ({j['waiting_for']})" if j.get("waiting_for") else "")
    arrow = "->" if j.get("direction") == "outbound" else "<-"
    peer = j["destination"] if j.get("direction") == "outbound" else j["source"]
    return f"{j['id']} {j['vm']:<12} {arrow} {peer:<21} {j['state']:<13} {bar(frac)} {frac * 100:5.1f}%{extra}{why}"


def emit(ns: Any, obj: Any, human: str) -> None:
    """The result of a command: JSON with --json, else the human text."""
    if getattr(ns, "json", False):
        print(json.dumps(obj, indent=2))
    else:
        print(human)


def emit_error(message: str, code: int, as_json: bool) -> int:
    """A failure: ``{"error", "code"}`` on stdout with --json, else one line on stderr. Returns ``code``."""
    if as_json:
        print(json.dumps({"error": message, "code": code}))
    else:
        print(f"livemig: {message}", file=sys.stderr)
    return code


def note(message: str) -> None:
    """A line about the outcome (not the result): always stderr, so --json stdout stays one document."""
    print(f"livemig: {message}", file=sys.stderr)
