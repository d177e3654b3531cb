"""deploy/docker-compose.yml and deploy/Dockerfile, validated without a Docker engine.

Three checks, each its own test so the summary says which ran:
- ``test_compose_config_cli``: ``docker compose config`` / ``docker-compose config``
  (works offline); skipped when neither is installed.
- ``test_compose_yaml_parse``: a real YAML parse with PyYAML, in this interpreter
  or in another ``python3`` on PATH that has it (PyYAML is not a dependency of
  livemig); skipped when no interpreter has it.
- ``test_compose_minimal_parse``: always runs; a tiny indentation-aware parser
  for the YAML subset the file uses (block mappings and sequences, flow
  ``[...]``/``{}``, quoted scalars, comments).
All three apply the same structural checks (``check_structure``).
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.daemon.config import load_config

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
TESTNET = ipaddress.ip_network("198.18.0.0/15")


# ---- structural checks, shared by every parser ------------------------------------
def _list_of_strings(v) -> list[str]:
    return v.split() if isinstance(v, str) else [str(x) for x in v]


def _mounts(svc: dict) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only), from the short or the long (normalized) volume syntax."""
    mounts = {}
    for v in svc["volumes"]:
        if isinstance(v, dict):
            mounts[v["target"]] = (v["source"], bool(v.get("read_only")))
        else:
            parts = v.split(":")
            mounts[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return mounts


def check_certs(doc: dict) -> None:
    """The one-shot certs service: a CA no agent sees, one certificate per agent in its own volume."""
    certs = doc["services"]["certs"]
    assert "build" in certs
    script = " ".join(_list_of_strings(certs["command"])) if not isinstance(certs["command"], str) else certs["command"]
    assert "livemig ca init /ca" in script and "livemig cert issue" in script, script
    assert "for n in a b c" in script, script
    assert certs.get("network_mode") == "none", "making certificates needs no network"
    m = _mounts(certs)
    assert m["/ca"][0].endswith("ca")
    for name in ("a", "b", "c"):
        assert m[f"/tls/{name}"][0].endswith(f"tls-{name}")
        agent = doc["services"][name]
        dep = agent["depends_on"]
        assert dep["certs"]["condition"] == "service_completed_successfully", dep
        am = _mounts(agent)
        assert am["/etc/livemig/tls"][0].endswith(f"tls-{name}") and am["/etc/livemig/tls"][1], am
        assert not any(src == "ca" or src.endswith("_ca") for src, _ in am.values()), \
            f"{name} must not mount the CA's volume"
    for vol in ("ca", "tls-a", "tls-b", "tls-c"):
        assert vol in doc["volumes"]


def check_structure(doc: dict, ca, normalized: bool = False) -> None:
    """``normalized``: the output of ``docker compose config`` (long volume syntax, absolute paths).
    ``ca``: a ThrowawayCA whose certificates stand in for those the certs service makes."""
    services = doc["services"]
    assert set(services) == {"certs", "a", "b", "c"}, sorted(services)
    check_certs(doc)
    nets = doc["networks"]
    mig = nets["migration"]
    assert mig.get("internal") in (True, "true"), "the migration network must be internal"
    subnet = ipaddress.ip_network(mig["ipam"]["config"][0]["subnet"])
    assert subnet.subnet_of(TESTNET), subnet
    vols = doc["volumes"]
    assert "control" in vols and "shared" in vols
    ips = set()
    for name, svc in services.items():
        if name == "certs":
            continue
        assert "build" in svc, f"{name}: every service names the build (never pulls livemig:latest)"
        shm = str(svc["shm_size"]).lower()
        assert shm in ("8gb", "8g", str(8 * 2**30)), f"{name}: shm_size {shm}"
        cmd = _list_of_strings(svc["command"])
        assert cmd[:3] == ["agent", "--config", "/etc/livemig/agent.toml"], cmd
        assert cmd[cmd.index("--name") + 1] == name
        host, port = cmd[cmd.index("--listen") + 1].rsplit(":", 1)
        control = cmd[cmd.index("--control") + 1]
        assert control == f"/run/livemig/{name}.sock"
        ip = svc["networks"]["migration"]["ipv4_address"]
        assert host == ip and ipaddress.ip_address(ip) in subnet and port == "7700"
        ips.add(ip)
        test = _list_of_strings(svc["healthcheck"]["test"])
        assert test[-4:] == ["livemig", "--agent", control, "status"] or test[-3:] == ["--agent", control, "status"], test
        mounts = {}
        for v in svc["volumes"]:
            if isinstance(v, dict):                        # long syntax (normalized output)
                mounts[v["target"]] = v["source"]
            else:
                src, dst = v.split(":")[:2]
                mounts[dst] = src
        assert mounts["/run/livemig"].endswith("control")
        assert mounts["/var/lib/livemig/shared"].endswith("shared")
        cfg_src = mounts["/etc/livemig/agent.toml"]
        cfg_path = Path(cfg_src) if normalized else (COMPOSE.parent / cfg_src)
        assert cfg_path.resolve() == (DEPLOY / "agent-compose.toml").resolve()
        creds = {f"security.{k}": v for k, v in ca.credentials(name).items()}
        cfg = load_config(cfg_path, {"agent.name": name, "agent.listen": f"{host}:{port}", "agent.control": control,
                                     **creds})
        assert cfg.security.mode == "tls"
    assert len(ips) == 3


# ---- a minimal YAML subset parser ------------------------------------------------------
def _scalar(s: str):
    s = s.strip()
    if s in ("{}",):
        return {}
    if s.startswith("[") and s.endswith("]"):
        return json.loads(s)                              # flow sequences of plain or double-quoted items
    if s.startswith('"') and s.endswith('"'):
        return json.loads(s)
    if s.startswith("'") and s.endswith("'"):
        return s[1:-1].replace("''", "'")
    if s in ("true", "false"):
        return s == "true"
    if re.fullmatch(r"-?\d+", s):
        return int(s)
    return s


def _strip_comment(line: str) -> str:
    out, quote = [], None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            break
        out.append(ch)
    return "".join(out).rstrip()


def mini_yaml(text: str):
    lines: list[tuple[int, str]] = []
    buf = None
    for raw in text.splitlines():
        assert "\t" not in raw, "tabs are not YAML indentation"
        line = _strip_comment(raw)
        if buf is not None:                               # continuing a multi-line flow sequence
            buf = (buf[0], buf[1] + " " + line.strip())
            if buf[1].count("[") == buf[1].count("]"):
                lines.append(buf)
                buf = None
            continue
        if not line.strip():
            continue
        entry = (len(line) - len(line.lstrip(" ")), line.strip())
        if entry[1].count("[") > entry[1].count("]"):
            buf = entry
            continue
        lines.append(entry)
    assert buf is None, "unterminated flow sequence"
    pos = 0

    def block(indent: int):
        nonlocal pos
        ind, text_ = lines[pos]
        assert ind == indent, (ind, indent, text_)
        if text_.startswith("- "):
            seq = []
            while pos < len(lines) and lines[pos][0] == indent and lines[pos][1].startswith("- "):
                ind, item = lines[pos]
                rest = item[2:]
                if re.match(r"^[A-Za-z0-9_.-]+:( |$)", rest):   # "- key: value" starts a mapping item
                    lines[pos] = (indent + 2, rest)
                    seq.append(block(indent + 2))
                else:
                    seq.append(_scalar(rest))
                    pos += 1
            return seq
        mapping = {}
        while pos < len(lines) and lines[pos][0] == indent and not lines[pos][1].startswith("- "):
            _, item = lines[pos]
            m = re.match(r"^([A-Za-z0-9_.-]+):(?: (.*))?$", item)
            assert m, f"unsupported YAML line: {item!r}"
            key, rest = m.group(1), (m.group(2) or "").strip()
            assert key not in mapping, f"duplicate key {key}"
            pos += 1
            if rest:
                mapping[key] = _scalar(rest)
            elif pos < len(lines) and lines[pos][0] > indent:
                mapping[key] = block(lines[pos][0])
            elif pos < len(lines) and lines[pos][0] == indent and lines[pos][1].startswith("- "):
                mapping[key] = block(indent)           # sequence at the key's own indentation
            else:
                mapping[key] = None
        return mapping

    doc = block(0)
    assert pos == len(lines), f"trailing content at {lines[pos]}"
    return doc


# ---- the three checks -----------------------------------------------------------------------
def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=20)
        if r.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_cli(cluster_ca):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed: the YAML checks ran instead")
    r = subprocess.run([*cli, "-f", str(COMPOSE), "config", "--format", "json"], capture_output=True, text=True,
                       timeout=50, cwd=DEPLOY)
    if r.returncode != 0 and "format" in r.stderr:         # docker-compose v1 has no --format
        r = subprocess.run([*cli, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=50, cwd=DEPLOY)
        assert r.returncode == 0, r.stderr
        check_structure(mini_yaml(r.stdout), cluster_ca, normalized=True)
        return
    assert r.returncode == 0, r.stderr
    check_structure(json.loads(r.stdout), cluster_ca, normalized=True)


def _yaml_as_json(path: Path):
    try:
        import yaml  # noqa: F401
        return yaml.safe_load(path.read_text()), f"PyYAML in {sys.executable}"
    except ImportError:
        pass
    code = "import json,sys,yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"
    for exe in dict.fromkeys(filter(None, (shutil.which("python3"), "/usr/bin/python3"))):
        if not os.path.exists(exe) or os.path.realpath(exe) == os.path.realpath(sys.executable):
            continue
        r = subprocess.run([exe, "-c", code, str(path)], capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            return json.loads(r.stdout), f"PyYAML in {exe}"
        if "No module named" not in r.stderr:
            raise AssertionError(f"{exe}: YAML parse failed:\n{r.stderr}")
    return None, None


def test_compose_yaml_parse(cluster_ca):
    doc, how = _yaml_as_json(COMPOSE)
    if doc is None:
        pytest.skip("PyYAML is not available to any python3 here: only the minimal parser check ran")
    print(f"compose file parsed with {how}")
    check_structure(doc, cluster_ca)


def test_compose_minimal_parse(cluster_ca):
    check_structure(mini_yaml(COMPOSE.read_text()), cluster_ca)


def test_minimal_parser_agrees_with_pyyaml_when_present():
    doc, _ = _yaml_as_json(COMPOSE)
    if doc is None:
        pytest.skip("PyYAML is not available to any python3 here: cannot cross-check the minimal parser")
    assert mini_yaml(COMPOSE.read_text()) == doc


def test_dockerfile():
    text = DOCKERFILE.read_text()
    instr = [ln for ln in text.splitlines() if ln and not ln.startswith("#") and not ln.startswith(" ")]
    assert instr[0] == "FROM python:3.11-slim"
    assert re.search(r"^RUN pip install \.", text, re.M)
    for d in ("agent", "protocol", "memstore"):
        assert re.search(rf"^COPY {d} \./{d}$", text, re.M), d
    assert 'CMD ["agent", "--config", "/etc/livemig/agent.toml"]' in text
    assert 'ENTRYPOINT ["livemig"]' in text
    assert re.search(r"^USER livemig$", text, re.M)
    # everything COPY names exists in the build context (the repository root)
    for m in re.finditer(r"^COPY (.+) \S+$", text, re.M):
        for src in m.group(1).split():
            assert (ROOT / src).exists(), src


def test_certs_script_runs(tmp_path):
    """The certs service's script, run here for real (its paths moved under tmp_path, chown
    skipped: no livemig user on this machine): a CA and a certificate per agent, each for its
    name, and a second run keeps them (compose `up` twice must not re-key the cluster)."""
    import shutil as _sh

    from agent.net.tls import cert_info

    doc = mini_yaml(COMPOSE.read_text())
    script = doc["services"]["certs"]["command"][0].replace("$$", "$")
    script = script.replace("/ca", str(tmp_path / "ca")).replace("/tls/", str(tmp_path / "tls") + "/")
    script = script.replace("chown -R livemig:livemig", "true")
    livemig = Path(sys.executable).with_name("livemig")
    env = dict(os.environ, PATH=f"{livemig.parent}:{os.environ.get('PATH', '')}")
    assert _sh.which("livemig", path=env["PATH"]), "the livemig entry point is not installed in the venv"
    for run in range(2):
        r = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        if run == 0:
            first = (tmp_path / "tls" / "a" / "host.crt").read_bytes()
    assert (tmp_path / "tls" / "a" / "host.crt").read_bytes() == first
    for name in ("a", "b", "c"):
        d = tmp_path / "tls" / name
        assert cert_info(str(d / "host.crt")).name == name
        assert (d / "ca.crt").read_bytes() == (tmp_path / "ca" / "ca.crt").read_bytes()
        assert not (d / "ca.key").exists()
