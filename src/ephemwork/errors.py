"""The exceptions that ephemwork raises, rooted in one class.

::

    EphemworkError
    ├── UsageError             the caller must change something (exit code 2)
    │   ├── ConfigError        ephemwork.toml is missing or invalid
    │   ├── InvalidNameError   a user or service name cannot go into a header
    │   ├── StateError         local state cannot be read or is held by another process
    │   └── AwsSetupError      AWS credentials, region, permissions or tools need fixing
    └── OperationError         something we depend on failed (exit code 1)
        ├── TunnelError        the SSH connection or a forward failed
        ├── ControlAPIError    the bastion's control API rejected a call
        │   └── ProtocolMismatchError   laptop and bastion speak different versions
        ├── DevServerError     the dev server did not build, start or become healthy
        └── AwsError           an AWS call failed; ``code`` holds the AWS error code

The CLI prints ``str(error)`` for any of these and exits with ``exit_code``; nothing
else should reach the user as a traceback.
"""

from __future__ import annotations


class EphemworkError(Exception):
    """Base class of every error ephemwork reports to a user."""

    exit_code: int = 1


class UsageError(EphemworkError):
    """The input, configuration or environment must be changed by the caller."""

    exit_code = 2


class ConfigError(UsageError):
    """``ephemwork.toml`` is missing, unreadable or invalid."""


class InvalidNameError(UsageError):
    """A user or service name contains characters a header value may not carry."""


class StateError(UsageError):
    """Local state is unusable, or another ``ephemwork up`` already owns a session."""


class OperationError(EphemworkError):
    """A network, SSH, bastion or dev-server operation failed."""


class TunnelError(OperationError):
    """The SSH connection to the bastion or one of its forwards failed."""


class ControlAPIError(OperationError):
    """The bastion's control API returned an error body."""

    def __init__(self, message: str, *, code: str = "error", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class ProtocolMismatchError(ControlAPIError):
    """The laptop and the bastion run incompatible ephemwork protocol versions."""


class DevServerError(OperationError):
    """The dev server's build, start or health check failed."""


class AwsSetupError(UsageError):
    """AWS credentials, the region, an IAM permission or a local AWS tool must be fixed."""


class AwsError(OperationError):
    """An AWS call failed for a reason the caller cannot fix by changing the input."""

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code
