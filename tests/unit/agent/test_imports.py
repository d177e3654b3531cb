"""The folders of agent/ are layers: an ast scan of every import (top level and
inside functions) checks the directions the architecture promises."""
from __future__ import annotations

import ast
import pathlib

AGENT = pathlib.Path(__file__).resolve().parents[3] / "agent"


def imports_of(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def modules(folder: str) -> list[pathlib.Path]:
    return sorted((AGENT / folder).rglob("*.py"))


def offenders(folders: list[str], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for folder in folders:
        for path in modules(folder):
            for name in imports_of(path):
                if name.startswith(forbidden):
                    bad.append(f"{path.relative_to(AGENT.parent)} imports {name}")
    return bad


def test_folders_exist():
    for folder in ("daemon", "control", "migration", "net", "observe", "cli", "bench"):
        assert modules(folder), folder


def test_migration_does_not_import_control_or_cli():
    assert offenders(["migration"], ("agent.control", "agent.cli", "agent.bench")) == []


def test_observe_sits_below_migration_and_control():
    assert offenders(["observe"], ("agent.control", "agent.cli", "agent.bench", "agent.migration")) == []


def test_net_does_not_import_control_or_cli():
    # (the endpoint hands inbound connections to the destination driver: net -> migration is allowed)
    assert offenders(["net"], ("agent.control", "agent.cli", "agent.bench")) == []


def test_nothing_imports_bench():
    others = [f for f in ("daemon", "control", "migration", "net", "observe", "cli")]
    assert offenders(others, ("agent.bench",)) == []


def test_scan_sees_function_level_imports(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from agent.bench.bench import main\n")
    assert "agent.bench.bench" in imports_of(p)
