"""Mutual TLS on by default: the CLI makes the CA and certificates, agents load and check them,
``status`` and the log say how the agent authenticates, and insecure mode is explicit and warned."""
from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys

import pytest

from agent.control.proc import AgentProcess, ThrowawayCA
from agent.daemon.config import load_config
from agent.errors import AgentError, ConfigError
from agent.net import tls

pytestmark = pytest.mark.timeout(120)


def livemig(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def test_ca_init_and_cert_issue_from_the_cli(tmp_path):
    ca, out = tmp_path / "ca", tmp_path / "host-a"
    r = livemig("ca", "init", str(ca), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ca_file"] == str(ca / "ca.crt")
    assert stat.S_IMODE(os.stat(ca / "ca.key").st_mode) == 0o600
    again = livemig("ca", "init", str(ca))
    assert again.returncode == 1 and "already there" in again.stderr        # never overwrites a CA
    r = livemig("cert", "issue", "host-a", "--ca", str(ca), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    files = json.loads(r.stdout)
    assert files["name"] == "host-a"
    assert stat.S_IMODE(os.stat(files["key_file"]).st_mode) == 0o600
    cert = tls.decode_cert_file(files["cert_file"])
    assert cert["subject"] == ((("commonName", "host-a"),),)
    assert ("DNS", "host-a") in cert["subjectAltName"]
    # The files are exactly what [security] needs, and they check out at load.
    cfg = load_config(None, {"agent.name": "host-a", **{f"security.{k}": files[k]
                                                       for k in ("ca_file", "cert_file", "key_file")}})
    assert cfg.security.mode == "tls"
    assert livemig("cert", "issue", "host-a", "--ca", str(ca), "--out", str(out)).returncode == 1   # no --force
    assert livemig("cert", "issue", "host-a", "--ca", str(ca), "--out", str(out), "--force").returncode == 0
    bad = livemig("cert", "issue", "a.b", "--ca", str(ca), "--out", str(tmp_path / "x"))
    assert bad.returncode == 1 and "a.b" in bad.stderr
    usage = livemig("cert", "issue", "x", "--out", str(tmp_path / "x"))
    assert usage.returncode == 2                                             # --ca is required


def test_config_errors_name_the_key(tmp_path, cluster_ca):
    a = cluster_ca.credentials("A")
    other = ThrowawayCA(str(tmp_path / "other")).credentials("A")

    def load(**over):
        return load_config(None, {"agent.name": "A", **{f"security.{k}": v for k, v in {**a, **over}.items()}})

    load()
    with pytest.raises(ConfigError, match=r"security\.ca_file: .*no such file"):
        load(ca_file=str(tmp_path / "missing.crt"))
    with pytest.raises(ConfigError, match=r"security\.cert_file: .* is for agent 'A', not for agent.name 'B'"):
        load_config(None, {"agent.name": "B", **{f"security.{k}": v for k, v in a.items()}})
    with pytest.raises(ConfigError, match=r"security\.key_file: .* does not load"):
        load(key_file=other["key_file"])
    with pytest.raises(ConfigError, match=r"security\.cert_file: .* not signed by security\.ca_file"):
        load(cert_file=other["cert_file"], key_file=other["key_file"])
    with pytest.raises(ConfigError, match=r"security\.mode: tls or insecure"):
        load_config(None, {"security.mode": "off"})
    with pytest.raises(ConfigError, match=r"control\.group: no group named"):
        load_config(None, {"security.mode": "insecure", "control.group": "no-such-group-livemig"})
    # The default config points at /etc/livemig/tls: without those files TLS mode names what is missing.
    if not os.path.exists("/etc/livemig/tls/ca.crt"):
        with pytest.raises(ConfigError, match=r"security\.ca_file: /etc/livemig/tls/ca\.crt.*security\.mode"):
            load_config(None, {})
    assert load_config(None, {"security.mode": "insecure"}).security.mode == "insecure"


def test_agent_without_credentials_does_not_start(tmp_path, shm_prefix):
    ag = AgentProcess("A", str(tmp_path), shm_prefix=shm_prefix,
                      extra_args=("--set", "security.ca_file=" + str(tmp_path / "none.crt")))
    with pytest.raises(AgentError, match="exited with 1"):
        ag.start()
    assert "security.ca_file" in ag.log_tail()


def test_status_shows_tls_and_migrations_run_over_it(agents):
    a, b = agents("A"), agents("B")
    st = a.call("status")["security"]
    assert st["mode"] == "tls" and st["certificate"] == "A" and "livemig-throwaway-ca" in st["issuer"]
    assert st["handshaking"] == 0 and st["established"] == 0
    a.call("vm.create", name="vm1", memory="32M", workload="uniform:rate=2000")
    rep = a.call("migrate", timeout_s=None, vm="vm1", to=b.addr, wait=True)
    assert rep["status"] == "completed" and rep["verified"], rep
    assert [v["name"] for v in b.call("vm.list")] == ["vm1"]
    # the stream really was TLS: B's log says so and has no insecure warning
    log = open(b.log_path).read()
    assert '"event": "tls_enabled"' in log and "security_insecure" not in log
    b.call("vm.delete", name="vm1")


def test_insecure_mode_is_explicit_warned_and_shown(agents):
    a = agents("A", insecure=True)
    st = a.call("status")["security"]
    assert st["mode"] == "insecure" and "no TLS" in st["warning"]
    lines = [json.loads(ln) for ln in open(a.log_path) if ln.startswith("{")]
    warn = [ln for ln in lines if ln.get("event") == "security_insecure"]
    assert warn and warn[0]["level"] == "warning"
    agents.restart(a)                                    # warned at every start
    lines = [json.loads(ln) for ln in open(a.log_path) if ln.startswith("{")]
    assert len([ln for ln in lines if ln.get("event") == "security_insecure"]) == 2


def test_tls_and_insecure_agents_do_not_talk(agents):
    a, b = agents("A"), agents("B", insecure=True)
    a.call("vm.create", name="vm1", memory="16M", workload="idle")
    rep = a.call("migrate", timeout_s=None, vm="vm1", to=b.addr, wait=True)
    assert rep["status"] == "failed", rep
    assert b.call("vm.list") == []
    assert a.call("vm.show", name="vm1")["state"] == "running"
    a.call("vm.delete", name="vm1")


def test_tls_context_is_tls13_only(cluster_ca):
    ctx = cluster_ca.client_context("A")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3 and ctx.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.timeout(240)
def test_the_demo_runs_over_tls():
    r = subprocess.run([sys.executable, "-m", "agent", "demo"], capture_output=True, text=True, timeout=230)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "A: mutual TLS 1.3, certificate 'A'" in r.stdout and "B: mutual TLS 1.3, certificate 'B'" in r.stdout
    assert "demo: OK" in r.stdout
