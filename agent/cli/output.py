"""What the CLI prints: tables, migration reports, progress bars, and errors (text or JSON)."""
from __future__ import annotations

import json
import sys
from typing import Any

from agent.cli.units import PAGE_BYTES, fmt_bytes, fmt_duration, fmt_mibps, fmt_ms, fmt_time, human, with_iso

FINAL_STATES = ("completed", "failed", "cancelled")


def table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[human(c, r.get(c), short=True) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def key_values(obj: dict, width: int) -> str:
    return "\n".join(f"{k:{width}} {human(k, v)}" for k, v in obj.items())


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
    """A migration's report: sizes in binary units, bandwidth in MiB/s, times as ISO 8601 and relative."""
    if r.get("kind") == "storage":
        from agent.cli.storage import format_storage_report

        return format_storage_report(r)
    when = [f"{k} {fmt_time(r[k + '_at'])}" for k in ("started", "finished") if r.get(k + "_at")]
    lines = [
        f"migration {r['id']}: {r['vm']} {r['source']} -> {r['destination']}",
        f"  state         {r.get('state', r['status'])}" + (f"  ({r['error']})" if r.get("error") else ""),
        f"  verified      {'yes' if r['verified'] else 'no'}"
        + (f"  ({r['verify_mode']}, {fmt_ms(r.get('verify_ms', 0))})" if r.get("verify_mode") else ""),
        *(f"  {w.split(' ', 1)[0]:13} {w.split(' ', 1)[1]}" for w in when),
        f"  total         {fmt_ms(r['total_ms'])}",
        f"  downtime      {fmt_ms(r['downtime_ms'])}",
        f"  iterations    {r['iterations']}  (convergence: {r.get('convergence') or '-'})",
        f"  pages sent    {r['pages_sent']} of {r['pages_total']}  (+{r['zero_pages']} zero pages announced)",
        f"  sent          {fmt_bytes(r['bytes_sent'])}, {fmt_mibps(r.get('throughput_gibps', 0) * 2**30)}",
        f"  guest rate    {r.get('guest_rate_before_pps', 0)} pages/s before, {r.get('guest_rate_during_pps', 0)} during"
        f" (throttle {r.get('throttle_pct', 0)}%)",
        f"  guest writes  {r.get('writes_at_pause', 0)} at pause, {r.get('writes_after_resume', 0)} at resume",
        "  phases        " + (", ".join(f"{k} {fmt_ms(v)}" for k, v in r["phases"].items()) or "-"),
    ]
    for rd in r.get("rounds", []):
        lines.append(f"    round {rd['round']:>2}: {fmt_bytes(rd['pages_sent'] * PAGE_BYTES):>10} in {fmt_ms(rd['ms']):>9},"
                     f" {fmt_mibps(rd['bandwidth_bps']):>11}, {rd['dirty_pages']:>6} pages dirty after")
    return "\n".join(lines)


def format_drain(r: dict) -> str:
    lines = [f"drain {r['status']} in {fmt_ms(r['drain_ms'])}",
             table(r["vms"], ["vm", "destination", "status", "verified", "total_ms", "downtime_ms", "error"])]
    if r["vms_left"]:
        lines.append(f"left on this host: {', '.join(r['vms_left'])}")
    return "\n".join(lines)


def bar(frac: float, width: int = 24) -> str:
    frac = min(max(frac, 0.0), 1.0)
    full = int(frac * width)
    return "[" + "#" * full + "." * (width - full) + "]"


def job_fraction(j: dict) -> float:
    """Done over done + left, from the figures shown beside it (sent, left); the pages
    of the VM before the first estimate of what is left."""
    total = j.get("pages_total") or 0
    done = j.get("pages_sent", 0)
    if j.get("state") == "completed":
        return 1.0
    if j.get("state") in FINAL_STATES or not done:
        return j.get("progress_pct", 0.0) / 100.0 if done else 0.0
    left = (j.get("remaining_bytes") or 0) // PAGE_BYTES
    if left:
        return min(done / (done + left), 0.999)
    return min(done / total, 0.999) if total else 0.0


def progress_figures(j: dict) -> str:
    """Round, sent / left, rate, dirty rate, expected downtime, ETA (the parts a job has)."""
    final = j.get("state") in FINAL_STATES
    parts = [f"round {j.get('round', 0)}",
             f"{fmt_bytes(j.get('pages_sent', 0) * PAGE_BYTES)} sent"
             + (f", {fmt_bytes(j['remaining_bytes'])} left" if j.get("remaining_bytes") and not final else ""),
             fmt_mibps(j.get("bandwidth_bps") or 0),
             f"dirty {fmt_mibps((j.get('dirty_rate_pps') or 0) * PAGE_BYTES)}"]
    if j.get("expected_downtime_ms") and not final:
        parts.append(f"downtime ~{fmt_ms(j['expected_downtime_ms'])}")
    if j.get("throttle_pct"):
        parts.append(f"throttle {j['throttle_pct']}%")
    if j.get("eta_s") is not None and not final:
        parts.append(f"ETA {fmt_duration(j['eta_s'])}")
    return "  ".join(parts)


def format_progress(j: dict) -> str:
    if j.get("kind") == "storage":
        from agent.cli.storage import format_storage_progress

        return format_storage_progress(j)
    frac = job_fraction(j)
    why = f" ({j['error']})" if j.get("error") else (f" ({j['waiting_for']})" if j.get("waiting_for") else "")
    arrow = "->" if j.get("direction") == "outbound" else "<-"
    peer = j["destination"] if j.get("direction") == "outbound" else j["source"]
    return (f"{j['id']} {j['vm']:<12} {arrow} {peer or '-':<21} {j['state']:<13} {bar(frac)} {frac * 100:5.1f}%  "
            f"{progress_figures(j)}{why}")


def emit(ns: Any, obj: Any, human: str) -> None:
    """The result of a command: JSON with --json, else the human text."""
    if getattr(ns, "json", False):
        print(json.dumps(with_iso(obj), indent=2))
    else:
        print(human)


def emit_error(message: str, code: int, as_json: bool) -> int:
    """A failure: ``{"error", "code"}`` on stdout with --json, else one line on stderr. Returns ``code``."""
    if as_json:
        print(json.dumps({"error": message, "code": code}), flush=True)
    else:
        print(f"livemig: {message}", file=sys.stderr)
    return code


def note(message: str) -> None:
    """A line about the outcome (not the result): always stderr, so --json stdout stays one document."""
    print(f"livemig: {message}", file=sys.stderr)
