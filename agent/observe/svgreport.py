"""One migration as an SVG picture, from its report dict (``Job.report()``).

``render_svg(report) -> str`` builds the document as a string (no
dependencies). Top to bottom, 900 x 600:

- title: VM, source -> destination, status, verified; the job id, its
  direction and start date (UTC); total time, downtime, RAM, bytes sent and
  the average bandwidth; the downtime against the downtime target when the
  report has one (``downtime_target_ms``);
- phase timeline: one bar, each phase's share of the migration, over a time
  axis (time since the start); the pause (start of stop-and-copy to the end
  of resume: the guest runs nowhere) outlined in red and labelled with the
  report's ``downtime_ms`` as it stands; a legend with every phase's
  duration (short phases are too thin to label in the bar);
- pages sent and dirty pages (left over after the round) per round, grouped
  bars on a log scale (round 1 moves all of RAM, late rounds a few hundred
  pages: both stay readable); the round sent while the guest was paused is
  hatched; with a downtime target, per round the pages that fit in it at the
  round's bandwidth (the switchover threshold, convergence.py);
- bandwidth per round (line), on the same x axis as the bars, with the
  throttle percentage where auto-converge throttled the guest and the
  bandwidth cap (``max_bandwidth_mibps``, per round when the round log has
  it, as ``job set`` can change it) when the report has one.

Works for 0, 1 or many rounds and for failed/cancelled migrations (no
verify/resume phases). Unknown or missing fields are drawn as absent;
elements a test looks for carry a ``class``.
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterable, Mapping
from xml.sax.saxutils import escape, quoteattr

WIDTH, HEIGHT = 900, 600
MARGIN_L, MARGIN_R = 70, 30
PLOT_W = WIDTH - MARGIN_L - MARGIN_R

PHASE_COLORS = {
    "queued": "#cfd8dc", "negotiate": "#b0bec5", "setup": "#90a4ae", "precopy": "#4e79a7",
    "stop-and-copy": "#e15759", "verify": "#f28e2b", "resume": "#edc948", "commit": "#59a14f",
    "cancelling": "#bab0ac", "rolling-back": "#9c755f",
}
# While the guest is paused (on the source) and not yet running (on the
# destination): from the start of stop-and-copy to the end of resume (the
# source's downtime clock: pause request -> Resumed). Phases that may sit in
# between, depending on the driver's order: verify (before or after resume).
# Without resume (a failed or cancelled migration), the pause lasts until the
# rollback has resumed the guest on the source.
PAUSE_ENDS_AFTER = ("verify", "rolling-back", "cancelling")
SENT_COLOR, DIRTY_COLOR, BW_COLOR, PAUSE_COLOR = "#4e79a7", "#f28e2b", "#59a14f", "#d62728"
TARGET_COLOR, CAP_COLOR = "#7b1fa2", "#8d6e63"       # downtime target / threshold, bandwidth cap
STATUS_COLORS = {"completed": "#2e7d32", "failed": "#c62828", "cancelled": "#6d4c41", "running": "#1565c0"}


# ---- formatting ---------------------------------------------------------------
def _num(v: Any, default: float = 0.0) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def fmt_ms(ms: float) -> str:
    ms = _num(ms)
    if ms >= 10_000:
        return f"{ms / 1000:.1f} s"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.1f} ms"


def fmt_bytes(n: float) -> str:
    n = _num(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_rate(bps: float) -> str:
    """Bytes/s in MiB/s: the one bandwidth unit of livemig (flags, reports, this picture)."""
    return f"{_num(bps) / 2**20:.1f} MiB/s"


def fmt_count(n: float) -> str:
    n = _num(n)
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e4:
        return f"{n / 1e3:.0f}k"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def nice_ticks(vmax: float, n: int = 4) -> list[float]:
    """0 and a few round steps covering ``vmax``."""
    if vmax <= 0:
        return [0.0, 1.0]
    raw = vmax / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    top = step * math.ceil(vmax / step - 1e-9)
    return [i * step for i in range(int(round(top / step)) + 1)]


# ---- SVG builder ----------------------------------------------------------------
class _Svg:
    def __init__(self) -> None:
        self.parts: list[str] = []

    @staticmethod
    def _attrs(kw: Mapping[str, Any]) -> str:
        out = []
        for k, v in kw.items():
            if v is None:
                continue
            if isinstance(v, float):
                v = f"{v:.2f}".rstrip("0").rstrip(".")
            out.append(f" {k.rstrip('_').replace('_', '-')}={quoteattr(str(v))}")
        return "".join(out)

    def el(self, tag: str, body: str | None = None, **kw: Any) -> None:
        if body is None:
            self.parts.append(f"<{tag}{self._attrs(kw)}/>")
        else:
            self.parts.append(f"<{tag}{self._attrs(kw)}>{body}</{tag}>")

    def rect(self, x: float, y: float, w: float, h: float, title: str | None = None, **kw: Any) -> None:
        if title is None:
            self.el("rect", x=x, y=y, width=max(w, 0.0), height=max(h, 0.0), **kw)
        else:
            self.el("rect", f"<title>{escape(title)}</title>", x=x, y=y, width=max(w, 0.0), height=max(h, 0.0), **kw)

    def text(self, x: float, y: float, s: str, **kw: Any) -> None:
        self.el("text", escape(s), x=x, y=y, **kw)

    def line(self, x1: float, y1: float, x2: float, y2: float, **kw: Any) -> None:
        self.el("line", x1=x1, y1=y1, x2=x2, y2=y2, **kw)

    def raw(self, s: str) -> None:
        self.parts.append(s)


def _phases(report: Mapping) -> list[tuple[str, float]]:
    ph = report.get("phases") or {}
    if not isinstance(ph, Mapping):
        return []
    return [(str(k), max(0.0, _num(v))) for k, v in ph.items()]


def _rounds(report: Mapping) -> list[dict]:
    out = []
    for i, rd in enumerate(report.get("rounds") or []):
        if not isinstance(rd, Mapping):
            continue
        out.append({
            "round": int(_num(rd.get("round"), i + 1)),
            "pages_sent": max(0.0, _num(rd.get("pages_sent"))),
            "dirty_pages": max(0.0, _num(rd.get("dirty_pages"))),
            "ms": max(0.0, _num(rd.get("ms"))),
            "bandwidth_bps": max(0.0, _num(rd.get("bandwidth_bps"))),
            "throttle_pct": _num(rd.get("throttle_pct")),
            # limits in force during the round, when the driver logs them (job set can change both)
            "max_bandwidth_mibps": _opt_num(rd.get("max_bandwidth_mibps")),
            "downtime_target_ms": _opt_num(rd.get("downtime_target_ms")),
        })
    return out


def _opt_num(v: Any) -> float | None:
    """A positive finite number, or None (absent, junk, or 0 = "no limit")."""
    f = _num(v, 0.0)
    return f if f > 0 else None


def _limits(report: Mapping, rounds: list[dict]) -> tuple[list[float | None], list[float | None]]:
    """Per round: the bandwidth cap (bytes/s) and the downtime target (ms), the round's own
    figure or else the report's (``max_bandwidth_mibps``, ``downtime_target_ms``); None = not known."""
    cap = _opt_num(report.get("max_bandwidth_mibps"))
    target = _opt_num(report.get("downtime_target_ms"))
    caps = [(rd["max_bandwidth_mibps"] or cap) for rd in rounds]
    return ([c * 2**20 if c else None for c in caps], [rd["downtime_target_ms"] or target for rd in rounds])


def fmt_exact_ms(v: Any) -> str:
    """A report's millisecond figure as it stands (``downtime_ms`` is already rounded), e.g. "37.2 ms"."""
    f = _num(v)
    return f"{int(f)} ms" if f.is_integer() else f"{f!r} ms"


def fmt_date(ts: Any) -> str:
    t = _num(ts)
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t > 0 else "date unknown"


def _pause_span(phases: list[tuple[str, float]]) -> tuple[int, int] | None:
    """Indexes (first, last) of the phases the guest spent paused, or None if it never was."""
    names = [n for n, _ in phases]
    if "stop-and-copy" not in names:
        return None
    first = names.index("stop-and-copy")
    if "resume" in names[first:]:
        return first, first + names[first:].index("resume")
    last = first
    while last + 1 < len(names) and names[last + 1] in PAUSE_ENDS_AFTER:
        last += 1
    return first, last


def _paused_round_index(report: Mapping, phases: list[tuple[str, float]], rounds: list[dict]) -> int | None:
    """The round sent during stop-and-copy (the driver logs it last), if it was sent."""
    names = [n for n, _ in phases]
    if not rounds or "stop-and-copy" not in names:
        return None
    scp = report.get("stop_copy_pages")
    if scp is not None and _num(scp) != rounds[-1]["pages_sent"]:
        return None
    if len(rounds) == 1 and scp is None:
        return None
    return len(rounds) - 1


def _title(svg: _Svg, r: Mapping, phases: list[tuple[str, float]], rounds: list[dict]) -> None:
    status = str(r.get("status", "?"))
    vm, src, dst = str(r.get("vm", "?")), str(r.get("source", "?")), str(r.get("destination", "?"))
    svg.text(MARGIN_L - 50, 28, f"{vm}: {src} \u2192 {dst}", font_size=18, font_weight="bold")
    badge = status + (" \u00b7 verified" if r.get("verified") else " \u00b7 not verified")
    svg.text(WIDTH - MARGIN_R, 28, badge, font_size=16, font_weight="bold", text_anchor="end",
             fill=STATUS_COLORS.get(status, "#333"))
    copy_ms = sum(ms for n, ms in phases if n in ("precopy", "stop-and-copy"))
    bytes_sent = _num(r.get("bytes_sent"))
    avg = bytes_sent / (copy_ms / 1000) if copy_ms > 0 else 0.0
    facts = [f"total {fmt_ms(r.get('total_ms', 0))}", f"downtime {fmt_ms(r.get('downtime_ms', 0))}",
             f"RAM {fmt_bytes(r.get('ram_bytes', 0))}", f"sent {fmt_bytes(bytes_sent)}",
             f"{len(rounds)} round{'s' if len(rounds) != 1 else ''}"]
    if avg:
        facts.append(f"avg {fmt_rate(avg)}")
    when = r.get("started_at") or r.get("queued_at")
    svg.text(MARGIN_L - 50, 47, f"job {r.get('id') or '?'}  \u00b7  {r.get('direction') or 'outbound'}  \u00b7  "
             f"started {fmt_date(when)}", font_size=12, fill="#555", class_="job")
    svg.text(MARGIN_L - 50, 66, "  \u00b7  ".join(facts), font_size=13, fill="#333")
    target = _opt_num(r.get("downtime_target_ms"))
    if target:
        _downtime_vs_target(svg, _num(r.get("downtime_ms")), target, WIDTH - MARGIN_R, 40)
    if r.get("error"):
        svg.text(MARGIN_L - 50, 83, f"error: {str(r['error'])[:120]}", font_size=12, fill=STATUS_COLORS["failed"])


def _downtime_vs_target(svg: _Svg, downtime_ms: float, target_ms: float, right: float, y: float) -> None:
    """A small bar, right-aligned at ``right``: the measured pause against the downtime target."""
    w = 140.0
    full = max(downtime_ms, target_ms)
    x0 = right - w
    svg.rect(x0, y, w * downtime_ms / full, 9, fill=PAUSE_COLOR, title=f"downtime {fmt_exact_ms(downtime_ms)}")
    svg.rect(x0, y - 2, w * target_ms / full, 13, fill="none", stroke=TARGET_COLOR, stroke_width=1.5,
             stroke_dasharray="4,2", class_="downtime-target", title=f"downtime target {fmt_exact_ms(target_ms)}")
    over = downtime_ms > target_ms
    svg.text(x0 - 6, y + 9, f"downtime target {fmt_exact_ms(target_ms)}" + (" (exceeded)" if over else ""),
             font_size=11, text_anchor="end", fill=PAUSE_COLOR if over else TARGET_COLOR, class_="target-label")


def _timeline(svg: _Svg, r: Mapping, phases: list[tuple[str, float]], y: float) -> None:
    h = 26
    svg.text(MARGIN_L - 50, y - 8, "phases", font_size=13, font_weight="bold")
    total = sum(ms for _, ms in phases)
    if total <= 0:
        svg.rect(MARGIN_L, y, PLOT_W, h, fill="#eee", stroke="#999")
        svg.text(MARGIN_L + PLOT_W / 2, y + 17, "no phase timings", font_size=12, text_anchor="middle", fill="#666")
        return
    scale = PLOT_W / total
    x = float(MARGIN_L)
    span = _pause_span(phases)
    pause_x0 = pause_x1 = None
    for i, (name, ms) in enumerate(phases):
        w = ms * scale
        svg.rect(x, y, w, h, title=f"{name}: {fmt_ms(ms)}", fill=PHASE_COLORS.get(name, "#999"),
                 stroke="#fff", stroke_width=0.5)
        label = f"{name} {fmt_ms(ms)}"
        if w >= 7 * len(label):
            svg.text(x + w / 2, y + 17, label, font_size=11, text_anchor="middle", fill="#fff")
        elif w >= 7 * len(name):
            svg.text(x + w / 2, y + 17, name, font_size=11, text_anchor="middle", fill="#fff")
        if span is not None and i == span[0]:
            pause_x0 = x
        if span is not None and i == span[1]:
            pause_x1 = x + w
        x += w
    _time_axis(svg, total, y + h)
    if pause_x0 is not None and pause_x1 is not None:
        pw = max(pause_x1 - pause_x0, 6.0)
        svg.rect(pause_x0, y - 4, pw, h + 8, fill="none", stroke=PAUSE_COLOR, stroke_width=2.5)
        label = f"pause: downtime {fmt_exact_ms(r.get('downtime_ms', 0))}"
        anchor = "end" if pause_x0 + pw / 2 > WIDTH - 160 else ("start" if pause_x0 < MARGIN_L + 120 else "middle")
        tx = {"end": pause_x0 + pw, "start": pause_x0, "middle": pause_x0 + pw / 2}[anchor]
        svg.text(tx, y + h + 32, label, font_size=12, font_weight="bold", fill=PAUSE_COLOR, text_anchor=anchor,
                 class_="pause-label")
    # legend: every phase with its duration (thin phases are unreadable in the bar)
    lx, ly = float(MARGIN_L), y + h + 52
    for name, ms in phases:
        label = f"{name} {fmt_ms(ms)}"
        wlabel = 14 + 6.3 * len(label) + 14
        if lx + wlabel > WIDTH - MARGIN_R:
            lx, ly = float(MARGIN_L), ly + 16
        svg.rect(lx, ly - 9, 10, 10, fill=PHASE_COLORS.get(name, "#999"))
        svg.text(lx + 14, ly, label, font_size=11, fill="#333")
        lx += wlabel


def _time_axis(svg: _Svg, total_ms: float, y: float) -> None:
    """Ticks under the phase bar: time since the job started."""
    svg.line(MARGIN_L, y, MARGIN_L + PLOT_W, y, stroke="#999", class_="time-axis")
    ticks = nice_ticks(total_ms, 8)
    for t in ticks:
        if t > total_ms * 1.0001:
            break
        tx = MARGIN_L + t / total_ms * PLOT_W
        svg.line(tx, y, tx, y + 4, stroke="#999")
        svg.text(tx, y + 14, fmt_tick_ms(t, ticks[1]), font_size=9, text_anchor="middle", fill="#555",
                 class_="time-tick")
    svg.text(MARGIN_L - 50, y + 14, "time", font_size=9, fill="#555")


def fmt_tick_ms(ms: float, step: float) -> str:
    """A time-axis label: seconds once the step is 1 s or more, else milliseconds."""
    if step >= 1000:
        return f"{ms / 1000:g} s"
    if ms >= 1000:
        return f"{ms / 1000:g} s"
    return f"{ms:g} ms"


def _y_axis(svg: _Svg, x0: float, y_top: float, h: float, ticks: list[float], fmt) -> float:
    top = ticks[-1] if ticks[-1] > 0 else 1.0
    for t in ticks:
        yy = y_top + h - t / top * h
        svg.line(x0, yy, x0 + PLOT_W, yy, stroke="#e0e0e0", stroke_width=1)
        svg.text(x0 - 6, yy + 4, fmt(t), font_size=10, text_anchor="end", fill="#555")
    svg.line(x0, y_top, x0, y_top + h, stroke="#999")
    svg.line(x0, y_top + h, x0 + PLOT_W, y_top + h, stroke="#999")
    return top


def log_ticks(vmax: float) -> list[float]:
    """Powers of ten from 1 up to the first one >= ``vmax`` (at least 1 and 10)."""
    top = max(1, math.ceil(math.log10(vmax))) if vmax > 1 else 1
    return [10.0 ** i for i in range(top + 1)]


class _LogScale:
    """Counts on a log10 axis, 1 at the bottom (0 sits on the axis too)."""

    def __init__(self, y_top: float, h: float, top: float) -> None:
        self.y_top, self.h, self.decades = y_top, h, math.log10(top)

    def height(self, v: float) -> float:
        return math.log10(v) / self.decades * self.h if v >= 1 else 0.0

    def y(self, v: float) -> float:
        return self.y_top + self.h - self.height(v)


def _log_axis(svg: _Svg, y_top: float, h: float, ticks: list[float]) -> _LogScale:
    sc = _LogScale(y_top, h, ticks[-1])
    for t in ticks:
        yy = sc.y(t)
        svg.line(MARGIN_L, yy, MARGIN_L + PLOT_W, yy, stroke="#e0e0e0", stroke_width=1)
        svg.text(MARGIN_L - 6, yy + 4, fmt_count(t), font_size=10, text_anchor="end", fill="#555", class_="log-tick")
    svg.line(MARGIN_L, y_top, MARGIN_L, y_top + h, stroke="#999")
    svg.line(MARGIN_L, y_top + h, MARGIN_L + PLOT_W, y_top + h, stroke="#999")
    return sc


def _round_slots(n: int) -> tuple[float, float]:
    slot = PLOT_W / max(n, 1)
    return slot, min(slot * 0.8, 80.0)


def _x_labels(svg: _Svg, rounds: list[dict], y: float) -> None:
    slot, _ = _round_slots(len(rounds))
    every = max(1, math.ceil(len(rounds) / 25))
    for i, rd in enumerate(rounds):
        if (len(rounds) - 1 - i) % every == 0:
            svg.text(MARGIN_L + slot * (i + 0.5), y, str(rd["round"]), font_size=10, text_anchor="middle", fill="#555")


def _pages_chart(svg: _Svg, rounds: list[dict], paused: int | None, targets: list[float | None],
                 y: float, h: float) -> None:
    svg.text(MARGIN_L - 50, y - 10, "pages per round (log scale)", font_size=13, font_weight="bold")
    lx = WIDTH - MARGIN_R - 330
    for i, (label, color) in enumerate((("pages sent", SENT_COLOR), ("dirty after the round", DIRTY_COLOR))):
        svg.rect(lx + i * 110, y - 19, 10, 10, fill=color)
        svg.text(lx + i * 110 + 14, y - 10, label, font_size=11, fill="#333")
    svg.rect(lx + 250, y - 19, 10, 10, fill="url(#paused)", stroke=PAUSE_COLOR)
    svg.text(lx + 264, y - 10, "paused", font_size=11, fill="#333")
    if not rounds:
        _log_axis(svg, y, h, log_ticks(1))
        svg.text(MARGIN_L + PLOT_W / 2, y + h / 2, "no rounds (the migration ended before pre-copy)",
                 font_size=12, text_anchor="middle", fill="#666")
        return
    # the switchover threshold: what fits in the downtime target at the round's bandwidth (convergence.py)
    thresholds = [rd["bandwidth_bps"] * t / 1000.0 / 4096 if t and rd["bandwidth_bps"] > 0 else None
                  for rd, t in zip(rounds, targets)]
    vmax = max(max(rd["pages_sent"], rd["dirty_pages"]) for rd in rounds)
    vmax = max([vmax] + [t for t in thresholds if t])
    sc = _log_axis(svg, y, h, log_ticks(vmax))
    slot, group = _round_slots(len(rounds))
    bw = group / 2
    for i, rd in enumerate(rounds):
        gx = MARGIN_L + slot * i + (slot - group) / 2
        for j, (key, color) in enumerate((("pages_sent", SENT_COLOR), ("dirty_pages", DIRTY_COLOR))):
            bh = sc.height(rd[key])
            tip = (f"round {rd['round']}: {int(rd['pages_sent'])} pages sent, {int(rd['dirty_pages'])} dirty, "
                   f"{fmt_ms(rd['ms'])}")
            svg.rect(gx + j * bw, y + h - bh, bw, bh, title=tip, fill=color)
            if i == paused and key == "pages_sent":
                svg.rect(gx, y + h - bh, bw, bh, fill="url(#paused)", stroke=PAUSE_COLOR, stroke_width=1.5)
        if len(rounds) <= 12:
            svg.text(gx + bw / 2, sc.y(rd["pages_sent"]) - 3, fmt_count(rd["pages_sent"]),
                     font_size=10, text_anchor="middle", fill="#333")
    if any(thresholds):
        for i, t in enumerate(thresholds):
            if t:
                ty = sc.y(t)
                tip = f"round {rounds[i]['round']}: {t:.0f} pages fit the downtime target at this bandwidth"
                svg.el("line", f"<title>{escape(tip)}</title>", x1=MARGIN_L + slot * i + 2, y1=ty,
                       x2=MARGIN_L + slot * (i + 1) - 2, y2=ty, stroke=TARGET_COLOR, stroke_width=2,
                       stroke_dasharray="4,3", class_="threshold")
        svg.line(lx - 185, y - 14, lx - 171, y - 14, stroke=TARGET_COLOR, stroke_width=2, stroke_dasharray="4,3")
        svg.text(lx - 167, y - 10, "fits the downtime target", font_size=11, fill="#333")
    _x_labels(svg, rounds, y + h + 13)


def _bandwidth_chart(svg: _Svg, rounds: list[dict], paused: int | None, caps: list[float | None],
                     y: float, h: float) -> None:
    if not rounds:
        svg.text(MARGIN_L - 50, y - 10, "bandwidth per round", font_size=13, font_weight="bold")
        _y_axis(svg, MARGIN_L, y, h, [0.0, 1.0], lambda t: "")
        return
    bits = [rd["bandwidth_bps"] for rd in rounds]          # bytes/s, drawn in MiB/s
    cap_bits = [c if c else None for c in caps]
    vmax = max(bits + [c for c in cap_bits if c])
    unit, div = "MiB/s", 2**20
    top = _y_axis(svg, MARGIN_L, y, h, nice_ticks(vmax / div), lambda t: f"{t:g}")
    svg.text(MARGIN_L - 50, y - 10, f"bandwidth per round ({unit})", font_size=13, font_weight="bold")
    slot, _ = _round_slots(len(rounds))
    if any(cap_bits):
        for i, c in enumerate(cap_bits):
            if c:
                cy = y + h - c / div / top * h
                svg.line(MARGIN_L + slot * i, cy, MARGIN_L + slot * (i + 1), cy, stroke=CAP_COLOR, stroke_width=1.5,
                         stroke_dasharray="6,3", class_="bandwidth-cap")
        last = max(i for i, c in enumerate(cap_bits) if c)
        svg.text(MARGIN_L + PLOT_W, y + h - cap_bits[last] / div / top * h - 4,
                 f"cap {fmt_rate(cap_bits[last])}", font_size=10, text_anchor="end", fill=CAP_COLOR,
                 class_="cap-label")
    # a round that sent nothing has no bandwidth to show (not "0 bit/s")
    shown = [i for i, rd in enumerate(rounds) if rd["pages_sent"] > 0 and rd["bandwidth_bps"] > 0]
    pts = {i: (MARGIN_L + slot * (i + 0.5), y + h - bits[i] / div / top * h) for i in shown}
    if len(pts) > 1:
        svg.el("polyline", points=" ".join(f"{px:.1f},{py:.1f}" for px, py in pts.values()), fill="none",
               stroke=BW_COLOR, stroke_width=2)
    for i, (px, py) in pts.items():
        rd = rounds[i]
        tip = f"round {rd['round']}: {fmt_rate(rd['bandwidth_bps'])}"
        svg.el("circle", f"<title>{escape(tip)}</title>", cx=px, cy=py, r=3.5,
               fill=PAUSE_COLOR if i == paused else BW_COLOR)
        if rd["throttle_pct"] != (rounds[i - 1]["throttle_pct"] if i else 0):
            svg.text(px, py - 7, f"{rd['throttle_pct']:.0f}%", font_size=9, text_anchor="middle", fill="#6d4c41")
        elif len(rounds) <= 12:
            svg.text(px, py - 7, fmt_rate(rd["bandwidth_bps"]), font_size=9, text_anchor="middle", fill="#333")
    _x_labels(svg, rounds, y + h + 13)
    svg.text(MARGIN_L + PLOT_W / 2, y + h + 28, "round", font_size=11, text_anchor="middle", fill="#555")
    if any(rd["throttle_pct"] > 0 for rd in rounds):
        svg.text(WIDTH - MARGIN_R, y - 10, "n% = guest throttle set (auto-converge)", font_size=10, text_anchor="end",
                 fill="#6d4c41")


def render_svg(report: Mapping[str, Any]) -> str:
    """An SVG document (UTF-8 text) picturing one migration report."""
    phases = _phases(report)
    rounds = _rounds(report)
    paused = _paused_round_index(report, phases, rounds)
    caps, targets = _limits(report, rounds)
    svg = _Svg()
    svg.raw(f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">')
    svg.raw(f"<title>{escape('livemig ' + str(report.get('id', '')) + ': ' + str(report.get('vm', '')))}</title>")
    svg.raw('<defs><pattern id="paused" width="6" height="6" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fbe9e7"/>'
            f'<line x1="0" y1="0" x2="0" y2="6" stroke="{PAUSE_COLOR}" stroke-width="3"/></pattern></defs>')
    svg.rect(0, 0, WIDTH, HEIGHT, fill="#ffffff")
    _title(svg, report, phases, rounds)
    _timeline(svg, report, phases, 112)
    _pages_chart(svg, rounds, paused, targets, 262, 150)
    _bandwidth_chart(svg, rounds, paused, caps, 462, 95)
    svg.raw("</svg>\n")
    return "\n".join(svg.parts)


def write_svg(report: Mapping[str, Any], path: str) -> None:
    """Render and write atomically enough for a CLI (``livemig report JOB --svg FILE``)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_svg(report))
