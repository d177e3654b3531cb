"""Agent-level errors. Library layers raise their own; the agent wraps them here."""
from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A configuration file, flag or run-time setting is wrong."""


class AdmissionRefused(AgentError):
    """The destination cannot take this VM (memory, name clash, maintenance...)."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.code = code


class PeerLost(AgentError):
    """The peer closed, reset or stalled the connection before the conversation ended."""


class PeerError(AgentError):
    """The peer answered with Abort/Reject."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.code = code


class VmError(AgentError):
    """A VM operation failed (unknown name, wrong state, guest did not answer)."""


class InvalidTransition(AgentError):
    """A phase change that the transition table does not allow."""


class MigrationAborted(AgentError):
    """A migration stopped before commit; the source copy is intact."""

    def __init__(self, phase: str, cause: BaseException | str) -> None:
        super().__init__(f"{phase}: {cause}")
        self.phase = phase
        self.cause = cause
