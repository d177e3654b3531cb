"""deploy/livemig-agent.service: required settings (pure parse), `systemd-analyze verify`, and the
`systemd-analyze security` exposure of the sandbox."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "livemig-agent.service"
VENV_EXE = "/opt/livemig/bin/livemig"          # the README's install step: python3 -m venv /opt/livemig
MAX_EXPOSURE = 2.5                              # systemd-analyze security: 5.9 (MEDIUM) before the sandbox


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit syntax: [Section], Key=Value (repeatable), # and ; comments, backslash continuation."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        assert section is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not Key=Value: {line!r}"
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def one(unit, section, key) -> str:
    vals = unit[section].get(key)
    assert vals, f"[{section}] {key}= missing"
    return vals[-1]


def test_required_settings():
    u = parse_unit(UNIT.read_text())
    s = "Service"
    assert one(u, s, "Type") == "notify"
    assert one(u, s, "NotifyAccess") == "main"
    assert one(u, s, "KillMode") == "process"              # guests survive an agent restart
    assert one(u, s, "Restart") == "on-failure"
    assert int(one(u, s, "WatchdogSec")) > 0
    assert int(one(u, s, "LimitNOFILE")) >= 65536
    exec_start = one(u, s, "ExecStart").split()
    assert exec_start[0] == VENV_EXE and exec_start[1] == "agent"
    assert exec_start[exec_start.index("--config") + 1] == "/etc/livemig/agent.toml"
    rw = " ".join(u[s]["ReadWritePaths"]).split()
    for path in ("/dev/shm", "/var/lib/livemig", "/run/livemig"):
        assert path in rw, rw
    assert one(u, s, "ProtectSystem") == "strict"
    assert one(u, s, "PrivateTmp") == "yes"
    assert one(u, s, "NoNewPrivileges") == "yes"
    assert one(u, s, "ProtectHome") == "yes"
    assert one(u, s, "StateDirectory") == "livemig"
    assert one(u, s, "RuntimeDirectory") == "livemig"
    # PrivateDevices would hide /dev/shm; DynamicUser implies RemoveIPC (deletes the guests' segments)
    assert u[s].get("PrivateDevices", ["no"])[-1] in ("no", "false")
    assert u[s].get("DynamicUser", ["no"])[-1] in ("no", "false")
    assert u[s].get("RemoveIPC", ["no"])[-1] in ("no", "false")
    assert one(u, "Install", "WantedBy") == "multi-user.target"


def test_sandbox_and_identity():
    u = parse_unit(UNIT.read_text())
    s = "Service"
    # a dedicated system user (guests are its children, so they run as it too); never root by default
    assert one(u, s, "User") == "livemig" and one(u, s, "Group") == "livemig"
    assert one(u, s, "CapabilityBoundingSet") == "" and one(u, s, "AmbientCapabilities") == ""
    assert one(u, s, "SystemCallFilter") == "@system-service"
    assert one(u, s, "SystemCallErrorNumber") == "EPERM"
    assert one(u, s, "ProtectProc") == "invisible"
    # ProcSubset=pid would hide /proc/meminfo, which admission reads (psutil.virtual_memory)
    assert u[s].get("ProcSubset", ["all"])[-1] == "all"
    assert one(u, s, "DevicePolicy") == "closed"        # device nodes closed, /dev/shm (a file system) kept
    for key in ("ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                "ProtectClock", "ProtectHostname", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
                "LockPersonality", "PrivateMounts"):
        assert one(u, s, key) == "yes", key
    assert one(u, s, "SystemCallArchitectures") == "native"
    assert set(one(u, s, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    text = UNIT.read_text()
    assert "useradd --system" in text and "/opt/livemig/bin/pip install" in text   # the install steps in the unit


def test_the_unit_documents_what_it_leaves_out():
    """Each setting deliberately not used says why next to it (a reader would otherwise add it back)."""
    comments = "\n".join(ln for ln in UNIT.read_text().splitlines() if ln.startswith("#"))
    for key in ("PrivateDevices=", "DynamicUser=", "ProcSubset=", "MemoryDenyWriteExecute=", "PrivateNetwork=",
                "~@privileged"):
        assert key in comments, key


def test_control_socket_matches_runtime_directory():
    """The example config puts the control socket where the unit lets the agent (and the CLI) reach it."""
    import tomllib

    with open(ROOT / "deploy" / "agent.toml", "rb") as f:
        cfg = tomllib.load(f)
    assert cfg["agent"]["control"].startswith("/run/livemig/")
    assert cfg["agent"]["data_dir"] == "/var/lib/livemig"


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "livemig-agent.service"
    path.write_text(unit_text)
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=50,
                          env=dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER=""))


def _livemig_exe() -> str:
    exe = Path(sys.executable).parent / "livemig"
    return str(exe) if exe.exists() else (shutil.which("livemig") or sys.executable)


def _problems(r: subprocess.CompletedProcess) -> list[str]:
    """Lines about our unit (the tool may also chatter about the host's own units)."""
    return [ln for ln in (r.stdout + r.stderr).splitlines() if "livemig-agent.service" in ln]


@pytest.fixture
def analyze():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed: only the parser check ran")
    return _verify


def test_systemd_analyze_verify(analyze, tmp_path):
    # verify insists that ExecStart's binary exists: point a copy at the real one.
    text = UNIT.read_text().replace(f"ExecStart={VENV_EXE}", f"ExecStart={_livemig_exe()}")
    r = analyze(text, tmp_path)
    out = r.stdout + r.stderr
    if r.returncode != 0 and not _problems(r) and "Failed to" in out:
        pytest.skip(f"systemd-analyze cannot run in this container: {out.strip()[:300]}")
    assert r.returncode == 0 and not _problems(r), out


def test_systemd_analyze_catches_mistakes(analyze, tmp_path):
    """Negative control: the same check flags a misspelt key and a missing binary."""
    good = UNIT.read_text().replace(f"ExecStart={VENV_EXE}", f"ExecStart={_livemig_exe()}")
    r = analyze(good.replace("KillMode=process", "KillMod=process"), tmp_path)
    if r.returncode != 0 and not _problems(r):
        pytest.skip(f"systemd-analyze cannot run in this container: {(r.stdout + r.stderr).strip()[:300]}")
    assert any("KillMod" in ln for ln in _problems(r)), r.stdout + r.stderr
    r = analyze(UNIT.read_text().replace(f"ExecStart={VENV_EXE}", "ExecStart=/nonexistent/livemig"),
                tmp_path)
    assert r.returncode != 0 and _problems(r), r.stdout + r.stderr


def test_security_exposure(analyze, tmp_path):
    """`systemd-analyze security --offline` rates the sandbox (5.9 MEDIUM before it was tightened)."""
    path = tmp_path / "livemig-agent.service"
    path.write_text(UNIT.read_text().replace(f"ExecStart={VENV_EXE}", f"ExecStart={_livemig_exe()}"))
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(path)], capture_output=True, text=True,
                       timeout=50, env=dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="", SYSTEMD_COLORS="0"))
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    if m is None:
        pytest.skip(f"systemd-analyze security --offline unavailable here: {(r.stdout + r.stderr).strip()[:300]}")
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout
    # negative control: the same check rates a unit without the sandbox worse
    bare = "\n".join(ln for ln in path.read_text().splitlines()
                     if not re.match(r"(Protect|Private|Restrict|SystemCall|Capability|User=|Group=|NoNew|Lock)", ln))
    path.write_text(bare)
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(path)], capture_output=True, text=True,
                       timeout=50, env=dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="", SYSTEMD_COLORS="0"))
    worse = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    assert worse and float(worse.group(1)) > float(m.group(1)) + 3, r.stdout
