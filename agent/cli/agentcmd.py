"""``livemig agent``: load the config from file + flags, check what a user can get wrong, run the daemon."""
from __future__ import annotations

import os
from typing import Any

from agent.cli.exits import CliError, UsageError

# flag attribute -> config key
FLAG_KEYS = (("name", "agent.name"), ("listen", "agent.listen"), ("control", "agent.control"),
             ("data_dir", "agent.data_dir"), ("shm_prefix", "agent.shm_prefix"),
             ("max_live_migrations", "limits.max_live_migrations"),
             ("downtime_ms", "migration.downtime_target_ms"),
             ("log_format", "log.format"), ("log_level", "log.level"))


def config_overrides(ns) -> dict[str, Any]:
    """The flags and every ``--set SECTION.KEY=VALUE`` as load_config overrides (--set wins)."""
    overrides: dict[str, Any] = {}
    for flag, key in FLAG_KEYS:
        v = getattr(ns, flag)
        if v is not None:
            overrides[key] = v
    for item in ns.set:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise UsageError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        overrides[k.strip()] = v.strip()
    return overrides


def check_data_dir(path: str) -> None:
    """Create the data directory as the agent would, so a bad path is one line, not a traceback."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise CliError(f"data directory {path}: {exc.strerror or exc}") from exc
    if not os.path.isdir(path):
        raise CliError(f"data directory {path}: not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise CliError(f"data directory {path}: not writable by this user")


def cmd_agent(ns) -> int:
    import asyncio

    from agent.daemon.config import load_config

    cfg = load_config(ns.config, config_overrides(ns))
    check_data_dir(cfg.agent.data_dir)
    from agent.cli.preflight import check_endpoints

    check_endpoints(cfg, ns.metrics)                  # "address in use: is another agent running?"
    from agent.daemon.agent import run_agent          # the daemon's imports only once the config is good
    from agent.observe.logs import configure_logging

    configure_logging(cfg.log.format, cfg.log.level)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        runner = asyncio.run
    return runner(run_agent(cfg, metrics=ns.metrics))
