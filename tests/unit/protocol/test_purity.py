"""protocol/ is sans-IO: importing it pulls in no IO, loop, logging or siblings."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import protocol

FORBIDDEN = {"socket", "asyncio", "structlog", "logging", "memstore", "agent", "selectors", "threading"}
PACKAGE_DIR = pathlib.Path(protocol.__file__).parent
#: stdlib + the two allowed third-party modules
ALLOWED_IMPORTS = {
    "__future__",
    "collections",
    "dataclasses",
    "enum",
    "hashlib",
    "hmac",
    "itertools",
    "operator",
    "os",
    "struct",
    "typing",
    "msgpack",
    "xxhash",
}


def test_fresh_interpreter_imports_nothing_forbidden():
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import protocol\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        cwd=PACKAGE_DIR.parent,
    ).stdout
    loaded = {name.split(".")[0] for name in json.loads(out)}
    assert "protocol" in loaded
    assert not loaded & FORBIDDEN, sorted(loaded & FORBIDDEN)


def test_import_lines_only_name_allowed_modules():
    """An ast scan, so a lazy import inside a function is caught too."""
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside protocol/
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in ALLOWED_IMPORTS, f"{path.name}: import {name}"


def test_no_clock_reads_prints_or_loggers():
    banned = {"print", "time", "datetime", "logging", "structlog", "getLogger", "monotonic", "perf_counter"}
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            assert name not in banned, f"{path.name}:{node.lineno} uses {name}"


def test_urandom_only_in_make_nonce():
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef):
                uses = any(isinstance(n, ast.Attribute) and n.attr == "urandom" for n in ast.walk(func))
                assert not uses or func.name == "make_nonce", f"{path.name}:{func.name}"


def test_only_framing_touches_msgpack():
    """Blobs stay opaque: messages validate ``Prepare.setup``/``SectionState.data``
    as bytes and never unpack them (each section parses its own)."""
    users = set()
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "msgpack" for a in node.names):
                users.add(path.name)
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("msgpack"):
                users.add(path.name)
    assert users == {"framing.py"}
