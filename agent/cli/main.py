"""The ``livemig`` command line: the agent daemon and the control client."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from agent.errors import AgentError, ConfigError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) if r.get(c) is not None else "-" for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
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
        f"  bytes sent    {r['bytes_sent']} ({_fmt_bytes(r['bytes_sent'])}), {r.get('throughput_gibps', 0):.2f} GiB/s",
        f"  guest rate    {r.get('guest_rate_before_pps', 0)} pages/s before, {r.get('guest_rate_during_pps', 0)} during"
        f" (throttle {r.get('throttle_pct', 0)}%)",
        f"  guest writes  {r.get('writes_at_pause', 0)} at pause, {r.get('writes_after_resume', 0)} at resume",
        "  phases (ms)   " + ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items()),
    ]
    for rd in r.get("rounds", []):
        lines.append(f"    round {rd['round']:>2}: {rd['pages_sent']:>7} pages in {rd['ms']:>8.1f} ms,"
                     f" {rd['bandwidth_bps'] / 2**30:6.2f} GiB/s, {rd['dirty_pages']:>6} dirty after")
    return "\n".join(lines)


def _bar(frac: float, width: int = 24) -> str:
    frac = min(max(frac, 0.0), 1.0)
    full = int(frac * width)
    return "[" + "#" * full + "." * (width - full) + "]"


def format_progress(j: dict) -> str:
    total = j.get("pages_total") or 0
    done = j.get("pages_sent", 0)
    final = j["state"] in ("completed", "failed", "cancelled")
    frac = j.get("progress_pct", 0.0) / 100.0 if "progress_pct" in j else (min(done / total, 1.0) if total else 0.0)
    bw = j.get("bandwidth_bps") or 0
    eta = j.get("eta_s")
    extra = (f" round {j.get('round', 0)} {bw / 2**20:7.1f} MiB/s dirty {j.get('dirty_rate_pps', 0)}/s"
             + (f" eta {eta:.1f}s" if eta is not None and not final else ""))
    why = f" ({j['error']})" if j.get("error") else (f" ({j['waiting_for']})" if j.get("waiting_for") else "")
    arrow = "->" if j.get("direction") == "outbound" else "<-"
    peer = j["destination"] if j.get("direction") == "outbound" else j["source"]
    return f"{j['id']} {j['vm']:<12} {arrow} {peer:<21} {j['state']:<13} {_bar(frac)} {frac * 100:5.1f}%{extra}{why}"


def watch_jobs(cl, interval_s: float) -> int:
    """Live progress bars until every job has ended."""
    import time

    tty = sys.stdout.isatty()
    while True:
        jobs = cl.call("jobs")
        lines = [format_progress(j) for j in jobs] or ["(no jobs)"]
        if tty:
            sys.stdout.write("\x1b[H\x1b[2J")
        print("\n".join(lines), flush=True)
        if all(j["state"] in ("completed", "failed", "cancelled") for j in jobs):
            return EXIT_OK
        if not tty:
            print("--", flush=True)
        time.sleep(interval_s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livemig", description="Live migration of shared-memory VMs between agents.")
    p.add_argument("--agent", default=os.environ.get("LIVEMIG_AGENT"),
                   help="control socket of the agent to talk to (default: $LIVEMIG_AGENT)")
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("agent", help="run an agent in the foreground until SIGTERM/SIGINT")
    a.add_argument("--name")
    a.add_argument("--listen", help="migration endpoint HOST:PORT (port 0 = ephemeral)")
    a.add_argument("--control", help="control socket path")
    a.add_argument("--data-dir")
    a.add_argument("--config", help="TOML config file")
    a.add_argument("--max-live-migrations", type=int)
    a.add_argument("--shm-prefix")
    a.add_argument("--downtime-ms", type=int)
    a.add_argument("--log-format", choices=("auto", "json", "console"))
    a.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    a.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    a.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")

    vm = sub.add_parser("vm", help="manage VMs").add_subparsers(dest="vmcmd", required=True)
    c = vm.add_parser("create")
    c.add_argument("name")
    c.add_argument("--memory", default="256M")
    c.add_argument("--workload", default="idle")
    c.add_argument("--prefill", choices=("none", "random"), default="none",
                   help="fill guest RAM before the guest starts (random = incompressible, no zero pages)")
    c.add_argument("--json", action="store_true")
    l = vm.add_parser("list")
    l.add_argument("--json", action="store_true")
    s = vm.add_parser("show")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    d = vm.add_parser("delete")
    d.add_argument("name")
    d.add_argument("--json", action="store_true")

    m = sub.add_parser("migrate", help="live-migrate a VM to another agent")
    m.add_argument("vm")
    m.add_argument("--to", required=True, metavar="HOST:PORT")
    m.add_argument("--wait", action="store_true", help="wait for the end and print the report")
    m.add_argument("--downtime-ms", type=int, help="downtime target for this migration")
    m.add_argument("--max-bandwidth", type=int, metavar="MIBPS", help="bandwidth cap for this migration (MiB/s)")
    m.add_argument("--json", action="store_true")

    m.add_argument("--priority", type=int, default=0, help="higher leaves the queue first (default 0)")

    dr = sub.add_parser("drain", help="maintenance: accept no VMs and move every VM to the targets")
    dr.add_argument("--to", action="append", required=True, metavar="HOST:PORT", help="a target (repeatable)")
    dr.add_argument("--wait", action="store_true")
    dr.add_argument("--downtime-ms", type=int)
    dr.add_argument("--max-bandwidth", type=int, metavar="MIBPS")
    dr.add_argument("--json", action="store_true")
    ud = sub.add_parser("undrain", help="end maintenance")
    ud.add_argument("--json", action="store_true")

    j = sub.add_parser("jobs", help="migrations of this agent (running and finished)")
    j.add_argument("--json", action="store_true")
    j.add_argument("--watch", action="store_true", help="live progress until every job has ended (Ctrl-C stops)")
    j.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    r = sub.add_parser("job", help="one migration's report")
    r.add_argument("id")
    r.add_argument("--wait", action="store_true")
    r.add_argument("--json", action="store_true")
    rp = sub.add_parser("report", help="one migration's report, or a picture of it (--svg)")
    rp.add_argument("id")
    rp.add_argument("--svg", metavar="FILE", help="write an SVG: rounds, dirty pages, bandwidth, the pause")
    rp.add_argument("--json", action="store_true")
    bn = sub.add_parser("bench", help="the benchmark: real agents, side by side with raw TCP")
    bn.add_argument("args", nargs=argparse.REMAINDER, help="--quick, --json, --out DIR, --only A,B, --runs N")
    k = sub.add_parser("cancel", help="cancel a migration before commit")
    k.add_argument("id")
    k.add_argument("--json", action="store_true")
    st = sub.add_parser("status", help="agent status")
    st.add_argument("--json", action="store_true")
    cf = sub.add_parser("config", help="change a setting at run time").add_subparsers(dest="cfgcmd", required=True)
    cs = cf.add_parser("set")
    cs.add_argument("key")
    cs.add_argument("value")
    cs.add_argument("--json", action="store_true")
    sub.add_parser("demo", help="two agents, one VM, one live migration")
    return p


def _run_agent(ns) -> int:
    import asyncio

    from agent.daemon.config import load_config
    from agent.daemon.agent import run_agent
    from agent.observe.logs import configure_logging

    overrides: dict[str, Any] = {}
    for flag, key in (("name", "agent.name"), ("listen", "agent.listen"), ("control", "agent.control"),
                      ("data_dir", "agent.data_dir"), ("shm_prefix", "agent.shm_prefix"),
                      ("max_live_migrations", "limits.max_live_migrations"),
                      ("downtime_ms", "migration.downtime_target_ms"),
                      ("log_format", "log.format"), ("log_level", "log.level")):
        v = getattr(ns, flag)
        if v is not None:
            overrides[key] = v
    for item in ns.set:
        k, sep, v = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        overrides[k.strip()] = v.strip()
    cfg = load_config(ns.config, overrides)
    configure_logging(cfg.log.format, cfg.log.level)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        runner = asyncio.run
    return runner(run_agent(cfg, metrics=ns.metrics))


def _client(ns):
    from agent.control.server import ControlClient

    if not ns.agent:
        raise AgentError("no agent given: use --agent SOCKET or set LIVEMIG_AGENT")
    return ControlClient(ns.agent)


def _migration_args(ns, **args) -> dict:
    """Options shared by migrate and drain, as control-API arguments."""
    args["wait"] = ns.wait
    if ns.downtime_ms is not None:
        args["downtime_ms"] = ns.downtime_ms
    if ns.max_bandwidth is not None:
        args["max_bandwidth_mibps"] = ns.max_bandwidth
    return args


def _out(ns, obj: Any, human: str) -> None:
    if getattr(ns, "json", False):
        print(json.dumps(obj, indent=2))
    else:
        print(human)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra and ns.cmd != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if ns.cmd == "agent":
            return _run_agent(ns)
        if ns.cmd == "demo":
            from agent.cli.demo import run_demo
            return run_demo()
        if ns.cmd == "bench":
            from agent.bench.bench import main as bench_main
            return bench_main([*extra, *ns.args])      # bench parses its own options
        cl = _client(ns)
        if ns.cmd == "vm":
            if ns.vmcmd == "create":
                r = cl.call("vm.create", timeout_s=300.0, name=ns.name, memory=ns.memory, workload=ns.workload,
                            prefill=ns.prefill)
                _out(ns, r, f"created {r['name']} ({_fmt_bytes(r['memory_bytes'])}, {r['workload']}): {r['state']}")
            elif ns.vmcmd == "list":
                r = cl.call("vm.list")
                _out(ns, r, _table(r, ["name", "state", "memory_bytes", "workload", "writes", "write_rate_pps"]))
            elif ns.vmcmd == "show":
                r = cl.call("vm.show", name=ns.name)
                _out(ns, r, "\n".join(f"{k:16} {v}" for k, v in r.items()))
            elif ns.vmcmd == "delete":
                r = cl.call("vm.delete", name=ns.name)
                _out(ns, r, f"deleted {r['deleted']}")
            return EXIT_OK
        if ns.cmd == "migrate":
            args = _migration_args(ns, vm=ns.vm, to=ns.to, priority=ns.priority)
            r = cl.call("migrate", timeout_s=None if ns.wait else 30.0, **args)
            if ns.wait:
                _out(ns, r, format_report(r))
                return EXIT_OK if r["status"] == "completed" else EXIT_FAIL
            _out(ns, r, r["id"])
            return EXIT_OK
        if ns.cmd == "jobs":
            if ns.watch:
                return watch_jobs(cl, ns.interval)
            r = cl.call("jobs")
            _out(ns, r, _table(r, ["id", "vm", "direction", "source", "destination", "state", "pages_sent", "error"]))
            return EXIT_OK
        if ns.cmd == "drain":
            args = _migration_args(ns, to=ns.to)
            r = cl.call("drain", timeout_s=None if ns.wait else 30.0, **args)
            if ns.wait:
                human = "\n".join([f"drain {r['status']} in {r['drain_ms']:.0f} ms", _table(
                    r["vms"], ["vm", "destination", "status", "total_ms", "downtime_ms", "error"])]
                    + ([f"left on this host: {', '.join(r['vms_left'])}"] if r["vms_left"] else []))
                _out(ns, r, human)
                return EXIT_OK if r["status"] == "completed" else EXIT_FAIL
            _out(ns, r, "maintenance on; queued " + " ".join(j["id"] for j in r["jobs"]))
            return EXIT_OK
        if ns.cmd == "undrain":
            r = cl.call("undrain")
            _out(ns, r, "maintenance off")
            return EXIT_OK
        if ns.cmd == "job":
            r = cl.call("job.wait" if ns.wait else "job.show", timeout_s=None if ns.wait else 30.0, id=ns.id)
            _out(ns, r, format_report(r))
            return EXIT_OK
        if ns.cmd == "report":
            r = cl.call("job.show", id=ns.id)
            if ns.svg:
                from agent.observe.svgreport import write_svg
                write_svg(r, ns.svg)
                _out(ns, {"svg": ns.svg, "id": r["id"]}, f"wrote {ns.svg}")
            else:
                _out(ns, r, format_report(r))
            return EXIT_OK
        if ns.cmd == "cancel":
            r = cl.call("cancel", timeout_s=None, id=ns.id)
            _out(ns, r, f"{r['id']}: {r['status']}")
            return EXIT_OK if r["status"] == "cancelled" else EXIT_FAIL
        if ns.cmd == "status":
            r = cl.call("status")
            _out(ns, r, "\n".join(f"{k:24} {v}" for k, v in r.items()))
            return EXIT_OK
        if ns.cmd == "config":
            r = cl.call("config.set", key=ns.key, value=ns.value)
            _out(ns, r, json.dumps(r))
            return EXIT_OK
    except AgentError as exc:
        print(f"livemig: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE
