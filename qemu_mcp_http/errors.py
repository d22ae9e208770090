"""Errors of qemu-mcp-http.

Every error the product raises on purpose derives from :class:`QemuMcpError`;
its ``message`` is safe to show to a client (it never holds a secret) and says
what was wrong and how to fix it.  Tools turn these into
``{success: false, message}``; anything else is a bug and is logged with its
traceback.

Tree::

    QemuMcpError
     ├── InvalidInput              a tool argument is malformed or not allowed
     ├── VMNotFound                no VM of that name on the host
     ├── VMExists                  create of a name already taken
     ├── VMStateError              the VM is not in a state that allows the action
     ├── QemuError                 QEMU / qemu-img failed
     │    └── QemuNotInstalled     the binary is missing on the host
     ├── QMPFailure                the VM's QMP socket misbehaved
     │    └── QMPUnavailable       no QMP endpoint to talk to
     ├── GuestAgentError           the guest agent answered a command with an error
     │    └── GuestAgentUnavailable  no agent answers (not installed or not running in the guest)
     │         └── GuestAgentReplyRefused  an answer larger than the command needs (a broken or hostile guest)
     ├── HostError                 the host (local or SSH) failed us; hosts raise only these
     │    ├── HostUnreachable      connect refused / timed out / DNS
     │    ├── HostAuthFailed       wrong password or key
     │    ├── HostKeyRejected      unknown or changed host key
     │    ├── CredentialUnusable   the key file is missing, unreadable or not a usable private key
     │    ├── CommandFailed        a command exited non-zero
     │    ├── CommandNotFound      a command does not exist on the host (the VM layer maps QEMU's
     │    │                        to QemuNotInstalled)
     │    ├── SocketUnavailable    nothing listens on a unix socket (mapped to QMPUnavailable, ...)
     │    └── OperationTimeout     a command or I/O exceeded its timeout
     ├── LimitExceeded             a configured limit would be exceeded
     └── ServerShuttingDown        the server stopped an open-ended call to shut down
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "CommandFailed",
    "CommandNotFound",
    "CredentialUnusable",
    "GuestAgentError",
    "GuestAgentReplyRefused",
    "GuestAgentUnavailable",
    "HostAuthFailed",
    "HostError",
    "HostKeyRejected",
    "HostUnreachable",
    "InvalidInput",
    "LimitExceeded",
    "OperationTimeout",
    "QMPFailure",
    "QMPUnavailable",
    "QemuError",
    "QemuMcpError",
    "QemuNotInstalled",
    "ServerShuttingDown",
    "SocketUnavailable",
    "VMExists",
    "VMNotFound",
    "VMStateError",
]


class QemuMcpError(Exception):
    """Root of every deliberate error; ``message`` is client-safe.

    ``details`` (client-safe too) go to the answer's ``data.details``: what was done before the failure,
    what was rolled back, the last lines of a console.
    """

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(QemuMcpError):
    """A tool argument is malformed or not allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"Invalid '{field}': {message}")
        self.field = field


class VMNotFound(QemuMcpError):
    """No VM of that name on the host."""


class VMExists(QemuMcpError):
    """``create`` of a name that is already taken."""


class VMStateError(QemuMcpError):
    """The VM's state does not allow the action."""


class LimitExceeded(QemuMcpError):
    """A configured limit would be exceeded."""


class QemuError(QemuMcpError):
    """QEMU or qemu-img failed; the message carries their own words."""


class QemuNotInstalled(QemuError):
    """The QEMU binary is missing on the host."""

    def __init__(self, binary: str, host: str) -> None:
        super().__init__(
            f"{binary}: command not found on {host}; install QEMU (6.0+) there, "
            "e.g. 'apt-get install qemu-system-x86 qemu-system-arm qemu-utils'"
        )
        self.binary = binary


class QMPFailure(QemuMcpError):
    """A QMP command failed or the monitor misbehaved."""


class QMPUnavailable(QMPFailure):
    """No QMP endpoint answered (QEMU not running, or its socket is stale)."""


class GuestAgentError(QemuMcpError):
    """The QEMU guest agent answered with an error."""


class GuestAgentUnavailable(GuestAgentError):
    """No guest agent answers: the VM is stopped, or qemu-guest-agent is not installed or not running in it."""


class GuestAgentReplyRefused(GuestAgentUnavailable):
    """The agent's answer was longer or held more elements than the command needs; its channel is dropped."""


class HostError(QemuMcpError):
    """The host (local or over SSH) failed an operation."""


class HostUnreachable(HostError):
    """The SSH connection could not be made."""


class HostAuthFailed(HostError):
    """The SSH server refused the credentials."""


class HostKeyRejected(HostError):
    """The SSH host key is unknown or has changed."""


class OperationTimeout(HostError):
    """A command, file operation or QMP call exceeded its timeout."""


class CredentialUnusable(HostError):
    """The SSH key file cannot be used (missing, unreadable, passphrase-protected, not a key)."""


class CommandNotFound(HostError):
    """``argv[0]`` does not exist on the host."""

    def __init__(self, command: str, host: str) -> None:
        super().__init__(f"{command}: command not found on {host}")
        self.command = command
        self.host = host


class SocketUnavailable(HostError):
    """Nothing accepts connections on a unix socket of the host (a stopped VM, a stale socket)."""

    def __init__(self, path: str, host: str, reason: str) -> None:
        super().__init__(f"nothing listens at {path} on {host}: {reason}")
        self.path = path
        self.host = host
        self.reason = reason


class CommandFailed(HostError):
    """A command exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        detail = stderr.strip() or f"exit status {returncode}"
        super().__init__(f"{argv[0]} failed: {detail}")
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr


class ServerShuttingDown(QemuMcpError):
    """The server is shutting down; VMs keep running, and the call may be repeated once it is back."""
