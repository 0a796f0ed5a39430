"""One hierarchy under VastdError; each subclass names the boundary that failed.

"Unreachable" is not "failed": SSHConnectionError and VastAIError never count as
a job attempt; only JobExecutionError (something observed on the instance) does.
"""

from __future__ import annotations


class VastdError(Exception):
    """Base of every error vastd raises on purpose."""


class ConfigError(VastdError):
    """The configuration is invalid; `problems` lists every one as 'key: message'."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


class VastAIError(VastdError):
    """The vast.ai API failed or answered something unexpected."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class APIShapeError(VastAIError):
    """The API answered with a body of an unexpected shape (never read as 'empty')."""


class InstanceError(VastdError):
    """An instance cannot be used (not ready, lost, preparation failed)."""


class PreparationError(InstanceError):
    """A [[prepare]] step failed on an instance."""


class SSHConnectionError(VastdError):
    """An SSH connection could not be opened or broke; never a job failure."""


class HostKeyMismatchError(SSHConnectionError):
    """The instance presented a host key other than the one pinned for it."""


class SSHAuthError(SSHConnectionError):
    """The instance answered but refused our key (it may have lost it: re-attach it)."""


class RemoteOutputTooLarge(SSHConnectionError):
    """A remote command printed more than vastd reads: the host is treated as broken
    (like an unreachable one), never its output held in memory."""


class RemoteCommandTimeout(SSHConnectionError):
    """A remote command or transfer did not finish before its deadline."""


class JobExecutionError(VastdError):
    """Something observed on the instance says the job failed (counts as an attempt)."""


class JobValidationError(VastdError):
    """A job file was refused at acceptance; the message is the reason."""


class ResultValidationError(JobExecutionError):
    """A result file is missing, unsafe, too large or unreadable."""


class ResultTooLargeError(ResultValidationError):
    """A result file (or a job's results together) passed a size cap while copied."""


class FileOperationError(VastdError):
    """A local file operation failed (disk full, read-only, permission)."""


class StateManagementError(VastdError):
    """The state snapshot cannot be read or written."""


class IllegalTransitionError(VastdError):
    """A state change the transition table (core/state.py) does not allow: a bug."""


class RunMismatchError(VastdError):
    """The remote job folder holds another run than the one asked for (never an attempt)."""
