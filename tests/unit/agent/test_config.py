import pytest

from agent.daemon.config import AgentConfig, SecuritySection, auto_streams, load_config, parse_hostport
from agent.errors import ConfigError


def test_defaults():
    # TLS is the default and needs certificate files; insecure is the one key changed here.
    cfg = load_config(None, {"security.mode": "insecure"})
    assert cfg == AgentConfig(security=SecuritySection(mode="insecure"))
    assert cfg.migration.max_rounds == 10 and cfg.migration.downtime_target_ms == 300
    assert cfg.limits.max_live_migrations == 2 and cfg.limits.max_storage_migrations == 2


def test_tls_default_needs_its_files():
    with pytest.raises(ConfigError, match="security"):
        load_config()


def test_file_then_overrides(tmp_path):
    p = tmp_path / "a.toml"
    p.write_text('[agent]\nname = "A"\nlisten = "127.0.0.1:7701"\n[limits]\nmax_live_migrations = 5\n')
    cfg = load_config(p, {"limits.max_live_migrations": "7", "migration.io_timeout_s": "2.5",
                          "security.mode": "insecure"})
    assert cfg.agent.name == "A" and cfg.agent.listen == "127.0.0.1:7701"
    assert cfg.limits.max_live_migrations == 7
    assert cfg.migration.io_timeout_s == 2.5


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("[migration]\nmax_round = 3\n", {}, "did you mean migration.max_rounds"),
        ("[migrations]\n", {}, "did you mean migration"),
        ("[limits]\nmax_live_migrations = 0\n", {}, "1..1024"),
        ("[limits]\nmax_live_migrations = true\n", {}, "expected an integer"),
        ("[agent]\nlisten = \"nowhere\"\n", {}, "HOST:PORT"),
        ("[agent]\nname = \"a.b\"\n", {}, "agent.name"),
        ("[log]\nformat = \"xml\"\n", {}, "log.format"),
        ("not toml [", {}, "config"),
        ("", {"migration.downtime": "5"}, "did you mean migration.downtime_target_ms"),
        ("", {"limits.max_live_migrations": "many"}, "expected an integer"),
        ("[migration]\nstreams = 9\n", {}, "migration.streams: 0"),
        ("", {"migration.prefault": "never"}, "migration.prefault: ahead or setup"),
    ],
)
def test_errors_are_clear(tmp_path, text, overrides, message):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(p, overrides)


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")


def test_parse_hostport():
    assert parse_hostport("127.0.0.1:7701") == ("127.0.0.1", 7701)
    assert parse_hostport("[::1]:0") == ("::1", 0)
    for bad in ("x", ":1", "h:", "h:99999", "h:p"):
        with pytest.raises(ConfigError):
            parse_hostport(bad)


def test_streams_auto_is_one_per_two_cores_and_an_explicit_count_wins(tmp_path):
    assert [auto_streams(c) for c in (1, 2, 3, 4, 8, 64)] == [1, 1, 1, 2, 4, 4]
    p = tmp_path / "s.toml"
    p.write_text("")
    assert load_config(p, {"security.mode": "insecure"}).migration.data_streams() == auto_streams()
    assert load_config(p, {"security.mode": "insecure", "migration.streams": "3"}).migration.data_streams() == 3
