"""The ``livemig`` command line: the agent daemon and the control client.

``main`` parses (parser.py), calls the command's function (commands.py,
agentcmd.py) and turns every user error into one line on stderr, or a JSON
object on stdout with --json, and its exit code (exits.py). Only bugs show a
traceback.
"""
from __future__ import annotations

import sys

from agent.errors import AgentError

from agent.cli.exits import EXIT_FAIL, EXIT_INTERRUPTED, CliError
from agent.cli.output import emit_error, format_progress, format_report  # noqa: F401 - re-exported (demo, tools)
from agent.cli.parser import build_parser


def parse_args(argv: list[str]):
    """The namespace for ``argv``; ``ns.extra`` holds what only ``bench`` may pass through."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra and ns.cmd != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    ns.extra = extra
    return ns


def _describe(exc: OSError) -> str:
    return f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (--help and --version exit through argparse)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv          # known before parsing, so usage errors honour it too
    try:
        ns = parse_args(argv)
        return ns.func(ns)
    except CliError as exc:
        return emit_error(exc.message, exc.code, as_json)
    except AgentError as exc:           # raised outside the control client, e.g. a bad config at 'livemig agent'
        return emit_error(str(exc), EXIT_FAIL, as_json)
    except OSError as exc:              # a file the user named (--svg FILE, ...)
        return emit_error(_describe(exc), EXIT_FAIL, as_json)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
