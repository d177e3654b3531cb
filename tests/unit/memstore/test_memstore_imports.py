"""memstore stays a leaf: no agent/protocol, no networking, no event loop,
no logging, no multiprocessing.shared_memory (DESIGN.md, STYLE.md 2.1)."""

import ast
import pathlib
import subprocess
import sys

import memstore

PKG = pathlib.Path(memstore.__file__).parent
ALLOWED_THIRD_PARTY = {"xxhash", "psutil", "msgpack"}
FORBIDDEN = {"agent", "protocol", "asyncio", "socket", "logging", "structlog", "uvloop",
             "multiprocessing", "selectors", "ssl", "threading"}


def imported_roots(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_import_lines_are_stdlib_or_allowed():
    for path in sorted(PKG.glob("*.py")):
        for root in imported_roots(path):
            assert root not in FORBIDDEN, f"{path.name} imports {root}"
            assert root in sys.stdlib_module_names or root in ALLOWED_THIRD_PARTY, (
                f"{path.name} imports {root}"
            )


def test_fresh_interpreter_loads_no_agent_protocol_or_event_loop():
    code = (
        "import sys, memstore, memstore.guest, memstore.scan, memstore.digest\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    roots = {m.split(".")[0] for m in out}
    for bad in ("agent", "protocol", "asyncio", "logging", "structlog", "uvloop"):
        assert bad not in roots, bad
    assert "multiprocessing.shared_memory" not in out


def test_public_api_is_exported():
    for name in memstore.__all__:
        assert getattr(memstore, name) is not None
