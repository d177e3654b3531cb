"""``livemig demo`` (``make demo``): two agents, one running VM, one verified live migration.

The agents speak mutual TLS, as in production: ``AgentProcess`` makes a
throwaway cluster CA in the demo's work dir (``livemig ca init`` / ``cert
issue`` underneath, which run openssl) and the work dir goes at the end."""
from __future__ import annotations

import secrets
import shutil
import tempfile

from agent.cli.output import format_report
from agent.errors import AgentError
from agent.control.proc import AgentProcess, wait_for

VM = "demo-vm"
MEMORY = "256M"
WORKLOAD = "hotset:ws=64M,rate=20000"


def _show_when(agent: AgentProcess, vm: str, cond, timeout_s: float, what: str) -> dict:
    """``vm.show`` polled until ``cond(info)`` holds; raises AgentError after ``timeout_s``."""
    def check():
        info = agent.call("vm.show", name=vm)
        return info if cond(info) else None
    return wait_for(check, timeout_s, 0.05, what=f"{vm} on {agent.name}: {what}", error=AgentError)


def _wait_writes_above(agent: AgentProcess, vm: str, threshold: int, timeout_s: float) -> dict:
    return _show_when(agent, vm, lambda i: i["writes"] > threshold, timeout_s, f"more than {threshold} writes")


def _settled_rate(agent: AgentProcess, vm: str, info: dict) -> dict:
    """The guest's rate is a 1 s window: give one window time to close (at most 5 s)."""
    if info["write_rate_pps"]:
        return info
    try:
        return _show_when(agent, vm, lambda i: i["write_rate_pps"] > 0, 5.0, "a write rate")
    except AgentError:
        return agent.call("vm.show", name=vm)


def _migrate_and_check(a: AgentProcess, b: AgentProcess) -> bool:
    info = a.call("vm.create", name=VM, memory=MEMORY, workload=WORKLOAD)
    print(f"created {VM} on A: {MEMORY}, workload {WORKLOAD}, guest pid {info['guest_pid']}")
    # Let the guest dirty its working set for a second before migrating it.
    info = _wait_writes_above(a, VM, 20000, 30.0)
    print(f"  guest running on A: {info['writes']} writes so far, {info['write_rate_pps']} pages/s")
    print(f"migrating {VM} A -> B ({b.addr}) ...")
    report = a.call("migrate", timeout_s=None, vm=VM, to=b.addr, wait=True)
    print(format_report(report))
    if report["status"] != "completed" or not report["verified"]:
        print("demo: migration did not complete and verify")
        return False
    on_a = [v["name"] for v in a.call("vm.list")]
    first = b.call("vm.show", name=VM)
    second = _settled_rate(b, VM, _wait_writes_above(b, VM, first["writes"] + 2000, 30.0))
    print(f"{VM} now on B: state {second['state']}, writes {report['writes_at_pause']} at pause -> "
          f"{first['writes']} -> {second['writes']} (still counting, {second['write_rate_pps']} pages/s)")
    print(f"VMs left on A: {on_a or 'none'}")
    b.call("vm.delete", name=VM)
    print("deleted the VM on B")
    return not on_a and second["state"] == "running"


def _clean_up(agents: tuple[AgentProcess, ...], workdir: str) -> None:
    """A demo leaves nothing behind, even after a failure."""
    for ag in agents:
        if ag.alive():
            try:
                for v in ag.call("vm.list"):
                    ag.call("vm.delete", name=v["name"])
            except AgentError:
                pass
        ag.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    print("agents stopped, work dir removed")


def run_demo() -> int:
    workdir = tempfile.mkdtemp(prefix="livemig-demo-")
    prefix = f"livemig-demo-{secrets.token_hex(3)}"
    a = AgentProcess("A", workdir, shm_prefix=prefix)
    b = AgentProcess("B", workdir, shm_prefix=prefix)
    ok = False
    try:
        print(f"starting agents A and B on 127.0.0.1 (work dir {workdir})")
        a.start()
        b.start()
        print(f"  A: migration endpoint {a.addr}, control {a.control}")
        print(f"  B: migration endpoint {b.addr}, control {b.control}")
        for ag in (a, b):
            sec = ag.call("status")["security"]
            if sec["mode"] != "tls":
                raise AgentError(f"agent {ag.name} runs without TLS ({sec['mode']})")
            print(f"  {ag.name}: mutual TLS 1.3, certificate {sec['certificate']!r} from the throwaway CA "
                  f"{sec['issuer']} in {workdir}/tls")
        ok = _migrate_and_check(a, b)
    except AgentError as exc:
        print(f"demo failed: {exc}")
        for ag in (a, b):
            print(f"--- log tail of {ag.name}:\n{ag.log_tail(15)}")
    finally:
        _clean_up((a, b), workdir)
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1
