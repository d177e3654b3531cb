"""deploy/agent.toml documents every config key; it and deploy/agent-compose.toml load as they are.

Both use security.mode = "tls" with the default credential paths under
/etc/livemig/tls, which this machine does not have: the tests load them with
those three paths pointed at certificates from the session's throwaway CA
(everything else exactly as written), and compare the paths as written."""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path

import pytest

from agent.daemon import config as cfgmod
from agent.daemon.config import AgentConfig, load_config

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "agent.toml"
COMPOSE_CFG = ROOT / "deploy" / "agent-compose.toml"
# Keys the example sets to a deployment value instead of the built-in default.
NOT_DEFAULT = {"agent.name", "agent.listen", "agent.control"}
CRED_KEYS = ("ca_file", "cert_file", "key_file")


def creds(ca, name: str) -> dict[str, str]:
    """Overrides that point the [security] paths at real certificates for ``name``."""
    return {f"security.{k}": v for k, v in ca.credentials(name).items()}


def sections() -> dict[str, type]:
    return {f.name: type(getattr(AgentConfig(), f.name)) for f in dataclasses.fields(AgentConfig)}


def test_example_loads(cluster_ca):
    cfg = load_config(EXAMPLE, creds(cluster_ca, "lab01"))
    assert cfg.agent.listen.endswith(":7700")
    assert cfg.agent.control == "/run/livemig/agent.sock"
    assert cfg.security.mode == "tls"


def test_example_without_its_certificates_names_what_is_missing():
    if os.path.exists("/etc/livemig/tls/ca.crt"):
        pytest.skip("this machine has /etc/livemig/tls")
    with pytest.raises(cfgmod.ConfigError, match=r"security\.ca_file: /etc/livemig/tls/ca\.crt: no such file"):
        load_config(EXAMPLE)


def test_every_key_is_present_and_documented():
    text = EXAMPLE.read_text()
    with open(EXAMPLE, "rb") as f:
        doc = tomllib.load(f)
    assert set(doc) == set(sections()), "one table per config section, no others"
    lines = text.splitlines()
    for sec, cls in sections().items():
        fields = [f.name for f in dataclasses.fields(cls)]
        assert sorted(doc[sec]) == sorted(fields), f"[{sec}]: file has {sorted(doc[sec])}, config has {fields}"
        start = lines.index(f"[{sec}]")
        for key in fields:
            i = next(i for i in range(start, len(lines)) if re.match(rf"{key}\s*=", lines[i]))
            assert lines[i - 1].startswith("#"), f"{sec}.{key} has no comment right above it"


def test_values_are_the_defaults_unless_deployment_specific(cluster_ca):
    cfg = load_config(EXAMPLE, creds(cluster_ca, "lab01"))
    with open(EXAMPLE, "rb") as fh:
        doc = tomllib.load(fh)
    default = AgentConfig()
    for sec in sections():
        for f in dataclasses.fields(type(getattr(default, sec))):
            key = f"{sec}.{f.name}"
            if key in NOT_DEFAULT:
                continue
            shown = doc[sec][f.name] if sec == "security" and f.name in CRED_KEYS else getattr(getattr(cfg, sec), f.name)
            assert shown == getattr(getattr(default, sec), f.name), (
                f"{key}: the example must show the default (or list it in NOT_DEFAULT with a comment)")


def test_metrics_listen_is_in_the_file_and_off_by_default():
    with open(EXAMPLE, "rb") as f:
        assert tomllib.load(f)["metrics"]["listen"] == ""


def test_a_typo_is_a_clear_error(tmp_path):  # the unknown key is found before any file is checked
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace("max_rounds = 10", "max_round = 10"))
    with pytest.raises(cfgmod.ConfigError, match="max_round; did you mean migration.max_rounds"):
        load_config(bad)


def test_compose_config_loads(cluster_ca):
    cfg = load_config(COMPOSE_CFG, {"agent.name": "a", "agent.listen": "198.18.1.11:7700",
                                    "agent.control": "/run/livemig/a.sock", **creds(cluster_ca, "a")})
    assert cfg.log.format == "json"
    assert cfg.agent.data_dir == "/var/lib/livemig"
    assert cfg.security.mode == "tls"
    with open(COMPOSE_CFG, "rb") as fh:
        doc = tomllib.load(fh)
    # as written, the compose config uses the default paths the certs service fills
    assert all(doc["security"].get(k, getattr(AgentConfig().security, k)) == f"/etc/livemig/tls/{n}"
               for k, n in zip(CRED_KEYS, ("ca.crt", "host.crt", "host.key")))
