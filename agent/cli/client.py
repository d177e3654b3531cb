"""The CLI's side of the control socket: every failure becomes a ``CliError`` with its exit code."""
from __future__ import annotations

from typing import Any

from agent.control.server import ControlClient
from agent.errors import AgentError

from agent.cli.exits import EXIT_FAIL, EXIT_UNREACHABLE, CliError, UsageError

UNKNOWN_OP_PREFIX = "unknown request"     # what ControlServer answers for an op it has no handler for


class Control:
    """Blocking calls to one agent; ``call`` returns the result or raises ``CliError``."""

    def __init__(self, path: str | None, timeout_s: float | None = 30.0) -> None:
        if not path:
            raise UsageError("no agent given: use --agent SOCKET or set LIVEMIG_AGENT")
        self.path = path
        self.client = ControlClient(path, timeout_s=timeout_s)

    def call(self, op: str, timeout_s: float | None = -1.0, **args) -> Any:
        try:
            return self.client.call(op, timeout_s=timeout_s, **args)
        except AgentError as exc:
            # ControlClient chains the OSError only when connect() failed: nothing answers there.
            if isinstance(exc.__cause__, OSError):
                raise CliError(str(exc), EXIT_UNREACHABLE) from exc
            if str(exc).startswith(UNKNOWN_OP_PREFIX):
                raise CliError(f"the agent at {self.path} does not know the operation {op!r}"
                               " (is it an older version?)") from exc
            raise CliError(str(exc), EXIT_FAIL) from exc
        except TimeoutError as exc:
            raise CliError(f"the agent at {self.path} did not answer {op!r} in time") from exc
        except OSError as exc:
            raise CliError(f"lost the connection to the agent at {self.path} during {op!r}: {exc}") from exc
        except ValueError as exc:          # not JSON: not a livemig agent, or a truncated answer
            raise CliError(f"unreadable answer from {self.path} to {op!r}: {exc}") from exc
