"""The cluster view without a coordinator: a hosts file naming three real agents."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)


def _cli(hosts_file: str, *args: str, agent: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LIVEMIG_AGENT"}
    env["LIVEMIG_HOSTS"] = hosts_file
    if agent:
        env["LIVEMIG_AGENT"] = agent
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=90, env=env)


def test_all_views_and_host_names_across_three_agents(agents, tmp_path):
    a, b, c = agents("A"), agents("B"), agents("C")
    hosts = tmp_path / "hosts.toml"
    hosts.write_text("".join(f'[hosts.{n}]\ncontrol = "{ag.control}"\naddress = "{ag.addr}"\n\n'
                             for n, ag in (("host-a", a), ("host-b", b), ("host-c", c))))
    for ag, vm in ((a, "va"), (b, "vb"), (c, "vc")):
        ag.call("vm.create", name=vm, memory="16M", workload="uniform:rate=500")
    r = _cli(str(hosts), "vm", "list", "--all")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert r.stdout.startswith("HOST") and {(row[0], row[1]) for row in rows} == \
        {("host-a", "va"), ("host-b", "vb"), ("host-c", "vc")}
    # --to and --agent by host name
    r = _cli(str(hosts), "--agent", "host-a", "migrate", "va", "--to", "host-b", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"-> {b.addr}" in r.stdout
    doc = json.loads(_cli(str(hosts), "jobs", "--all", "--json").stdout)
    assert doc["errors"] == [] and doc["hosts"] == ["host-a", "host-b", "host-c"]
    assert sorted((j["host"], j["direction"]) for j in doc["rows"]) == [("host-a", "outbound"), ("host-b", "inbound")]
    r = _cli(str(hosts), "jobs", "--all", "--vm", "vc")
    assert r.returncode == 0 and r.stdout.strip() == "(none)"
    r = _cli(str(hosts), "hosts")
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(n in r.stdout for n in ("host-a", "host-b", "host-c")) and "None" not in r.stdout
    # a host that does not answer: the others are shown, it is named on stderr, exit 1
    with hosts.open("a") as f:
        f.write(f'[hosts.gone]\ncontrol = "{tmp_path / "gone.sock"}"\n')
    r = _cli(str(hosts), "vm", "list", "--all")
    assert r.returncode == 1 and "vb" in r.stdout and "va" in r.stdout
    assert r.stderr.startswith("livemig: host gone: cannot reach the agent") and "Traceback" not in r.stderr
    # a broken hosts file: one line naming the file and the key
    hosts.write_text('[hosts.x]\ncontrol = 5\n')
    r = _cli(str(hosts), "vm", "list", "--all")
    assert r.returncode == 1 and "hosts.x.control" in r.stderr and str(hosts) in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = _cli(str(hosts), "vm", "list", "--all", "--json")
    assert r.returncode == 1 and "hosts.x.control" in json.loads(r.stdout)["error"]
    r = _cli(str(tmp_path / "missing.toml"), "jobs", "--all")
    assert r.returncode == 1 and "no such file" in r.stderr
    for ag, vm in ((b, "va"), (b, "vb"), (c, "vc")):
        ag.call("vm.delete", name=vm)
