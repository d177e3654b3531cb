"""deploy/livemig-agent.service: required settings (pure parse) and `systemd-analyze verify`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "livemig-agent.service"


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
    assert exec_start[0].endswith("/livemig") and exec_start[1] == "agent"
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
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/livemig", f"ExecStart={_livemig_exe()}")
    r = analyze(text, tmp_path)
    out = r.stdout + r.stderr
    if r.returncode != 0 and not _problems(r) and "Failed to" in out:
        pytest.skip(f"systemd-analyze cannot run in this container: {out.strip()[:300]}")
    assert r.returncode == 0 and not _problems(r), out


def test_systemd_analyze_catches_mistakes(analyze, tmp_path):
    """Negative control: the same check flags a misspelt key and a missing binary."""
    good = UNIT.read_text().replace("ExecStart=/usr/local/bin/livemig", f"ExecStart={_livemig_exe()}")
    r = analyze(good.replace("KillMode=process", "KillMod=process"), tmp_path)
    if r.returncode != 0 and not _problems(r):
        pytest.skip(f"systemd-analyze cannot run in this container: {(r.stdout + r.stderr).strip()[:300]}")
    assert any("KillMod" in ln for ln in _problems(r)), r.stdout + r.stderr
    r = analyze(UNIT.read_text().replace("ExecStart=/usr/local/bin/livemig", "ExecStart=/nonexistent/livemig"),
                tmp_path)
    assert r.returncode != 0 and _problems(r), r.stdout + r.stderr
