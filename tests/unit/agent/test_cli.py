"""The CLI in process: parsing, option checks, exit-code rules, error output, and its own shape."""
from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import pathlib

import pytest

from agent.cli import commands, main as cli_main
from agent.cli.exits import EXIT_FAIL, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from agent.cli.main import main, parse_args
from agent.cli.parser import build_parser

CLI_DIR = pathlib.Path(cli_main.__file__).parent


def _leaf_parsers(parser: argparse.ArgumentParser, path=()):
    """Every (command path, parser) that has no sub-commands of its own."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaf_parsers(child, (*path, name))


def test_every_command_has_a_function_and_every_option_a_help():
    leaves = list(_leaf_parsers(build_parser()))
    names = {" ".join(path) for path, _ in leaves}
    assert {"agent", "vm create", "vm pause", "vm resume", "vm start", "migrate", "drain", "job", "jobs",
            "cancel", "config set", "status", "report", "bench", "demo"} <= names
    for path, p in leaves:
        assert callable(p.get_default("func")), path
        for action in p._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, (path, action.dest)


@pytest.mark.parametrize("argv, func", [
    (["vm", "pause", "v1"], commands.cmd_vm_pause),
    (["vm", "resume", "v1", "--force"], commands.cmd_vm_resume),
    (["vm", "start", "v1"], commands.cmd_vm_start),
    (["migrate", "v1", "--to", "h:1"], commands.cmd_migrate),
    (["config", "set", "k", "v"], commands.cmd_config_set),
    (["job", "j1", "--wait"], commands.cmd_job),
])
def test_dispatch_goes_through_the_parser(argv, func):
    assert parse_args(argv).func is func


def test_migrate_request_carries_verify_and_the_checked_options():
    ns = parse_args(["migrate", "v1", "--to", "h:1", "--verify", "full", "--downtime-ms", "50",
                     "--max-bandwidth", "0", "--priority", "-3"])
    assert commands.migrate_args(ns) == {"vm": "v1", "to": "h:1", "priority": -3, "verify": "full", "wait": False,
                                         "downtime_ms": 50, "max_bandwidth_mibps": 0}
    plain = commands.migrate_args(parse_args(["migrate", "v1", "--to", "h:1", "--wait"]))
    assert plain == {"vm": "v1", "to": "h:1", "priority": 0, "verify": None, "wait": True}
    assert parse_args(["vm", "resume", "v1"]).force is False


@pytest.mark.parametrize("argv, needle", [
    (["migrate", "v", "--to", "h:1", "--downtime-ms", "0"], "--downtime-ms: must be >= 1, got 0"),
    (["migrate", "v", "--to", "h:1", "--downtime-ms", "fast"], "--downtime-ms: expected an integer >= 1"),
    (["migrate", "v", "--to", "h:1", "--max-bandwidth", "-1"], "--max-bandwidth: must be >= 0, got -1"),
    (["migrate", "v", "--to", "h:1", "--priority", "high"], "--priority: expected an integer, got 'high'"),
    (["migrate", "v", "--to", "h:1", "--verify", "some"], "invalid choice: 'some'"),
    (["drain", "--to", "h:1", "--downtime-ms", "-5"], "--downtime-ms: must be >= 1, got -5"),
    (["vm", "list", "extra"], "unrecognized arguments: extra"),
])
def test_bad_values_are_one_line_usage_errors(argv, needle, capsys):
    assert main(argv) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and needle in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert main([*argv, "--json"]) == EXIT_USAGE
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["code"] == EXIT_USAGE and needle in doc["error"] and err == ""


def test_agent_start_errors_are_one_line(tmp_path, capsys):
    assert main(["agent", "--set", "nokey"]) == EXIT_USAGE
    assert "--set expects SECTION.KEY=VALUE" in capsys.readouterr().err
    afile = tmp_path / "a-file"
    afile.write_text("")
    assert main(["agent", "--data-dir", str(afile / "data"), "--control", str(tmp_path / "c.sock"),
                 "--set", "security.mode=insecure"]) == EXIT_FAIL
    err = capsys.readouterr().err
    assert f"data directory {afile / 'data'}: Not a directory" in err and err.count("\n") == 1, err
    assert main(["agent", "--set", "migration.max_round=3", "--data-dir", str(tmp_path)]) == EXIT_FAIL
    assert "did you mean migration.max_rounds" in capsys.readouterr().err


def test_no_agent_given_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.delenv("LIVEMIG_AGENT", raising=False)
    assert main(["vm", "list"]) == EXIT_USAGE
    assert "no agent given" in capsys.readouterr().err


def test_socket_with_nothing_behind_it_is_unreachable(tmp_path, capsys):
    assert main(["--agent", str(tmp_path / "none.sock"), "status", "--json"]) == EXIT_UNREACHABLE
    doc = json.loads(capsys.readouterr().out)
    assert doc["code"] == EXIT_UNREACHABLE and "cannot reach the agent" in doc["error"]


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"livemig {importlib.metadata.version('livemig')}"


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["migrate", "--help"])
    out = capsys.readouterr().out
    for line in ("0  done", "1  failed", "2  usage error", "3  the agent could not be reached"):
        assert line in out
    with pytest.raises(SystemExit):
        main(["vm", "resume", "--help"])
    assert "two copies" in capsys.readouterr().out


def _report(status: str, verified: bool) -> dict:
    return {"id": "m1", "vm": "v1", "status": status, "verified": verified}


@pytest.mark.parametrize("status, verified, code", [
    ("completed", True, EXIT_OK), ("completed", False, EXIT_FAIL),
    ("failed", False, EXIT_FAIL), ("cancelled", False, EXIT_FAIL),
])
def test_migration_exit_needs_completed_and_verified(status, verified, code, capsys):
    assert commands.migration_exit(_report(status, verified)) == code
    err = capsys.readouterr().err
    assert ("completed but was not verified" in err) == (status == "completed" and not verified)


def test_drain_exit_needs_every_vm_verified(capsys):
    vms = [{"vm": "a", "status": "completed", "verified": True}, {"vm": "b", "status": "completed", "verified": True}]
    assert commands.drain_exit({"status": "completed", "vms": vms}) == EXIT_OK
    vms[1]["verified"] = False
    assert commands.drain_exit({"status": "completed", "vms": vms}) == EXIT_FAIL
    assert "not verified: b" in capsys.readouterr().err
    assert commands.drain_exit({"status": "incomplete", "vms": vms[:1]}) == EXIT_FAIL


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_cli_functions_stay_small():
    for path in CLI_DIR.glob("*.py"):
        for fn in _functions(ast.parse(path.read_text())):
            size = fn.end_lineno - fn.lineno + 1
            limit = 30 if (path.name, fn.name) == ("main.py", "main") else 50
            assert size < limit, f"{path.name}:{fn.name} is {size} lines"
