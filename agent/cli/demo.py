"""``livemig demo`` (``make demo``): two agents, one running VM, one verified live migration."""
from __future__ import annotations

import secrets
import shutil
import tempfile
import time

from agent.cli.main import format_report
from agent.errors import AgentError
from agent.control.proc import AgentProcess

VM = "demo-vm"
MEMORY = "256M"
WORKLOAD = "hotset:ws=64M,rate=20000"


def _wait_writes_above(agent: AgentProcess, vm: str, threshold: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = agent.call("vm.show", name=vm)
        if info["writes"] > threshold:
            return info
        if time.monotonic() > deadline:
            raise AgentError(f"{vm} on {agent.name}: writes stuck at {info['writes']}")
        time.sleep(0.05)


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
            return 1
        on_a = [v["name"] for v in a.call("vm.list")]
        first = b.call("vm.show", name=VM)
        second = _wait_writes_above(b, VM, first["writes"] + 2000, 30.0)
        deadline = time.monotonic() + 5.0          # the guest's rate is a 1 s window: let one close
        while second["write_rate_pps"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
            second = b.call("vm.show", name=VM)
        print(f"{VM} now on B: state {second['state']}, writes {report['writes_at_pause']} at pause -> "
              f"{first['writes']} -> {second['writes']} (still counting, {second['write_rate_pps']} pages/s)")
        print(f"VMs left on A: {on_a or 'none'}")
        ok = not on_a and second["state"] == "running"
        b.call("vm.delete", name=VM)
        print("deleted the VM on B")
    except AgentError as exc:
        print(f"demo failed: {exc}")
        for ag in (a, b):
            print(f"--- log tail of {ag.name}:\n{ag.log_tail(15)}")
    finally:
        for ag in (a, b):             # a demo leaves nothing behind, even after a failure
            if ag.alive():
                try:
                    for v in ag.call("vm.list"):
                        ag.call("vm.delete", name=v["name"])
                except AgentError:
                    pass
            ag.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print("agents stopped, work dir removed")
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1
