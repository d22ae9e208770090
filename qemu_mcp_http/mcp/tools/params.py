"""The parameters every tool shares: where the VMs are (``vm_dir``) and the five that name the host and log in to
it. The host ones are declared once here and added to each tool's input schema at registration (see
:mod:`.spec`), after the tool's own: the schema clients see is the one each tool had when it listed them itself.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any

from pydantic import Field

from ...fleet.targets import HostRequest

__all__ = [
    "HOST_PARAMETERS",
    "HostArg",
    "SshKeyArg",
    "SshPortArg",
    "SshPwdArg",
    "SshUserArg",
    "VmDirArg",
    "host_request",
]

HostArg = Annotated[str, Field(description="Remote host name or IP; omit (or 'localhost') for the local machine")]
SshPortArg = Annotated[int, Field(description="SSH port of the remote host", ge=1, le=65535)]
SshUserArg = Annotated[str | None, Field(description="SSH user name (required for remote operations)")]
SshPwdArg = Annotated[
    str | None,
    Field(
        description="SSH password (remote operations; ssh_key takes precedence)",
        json_schema_extra={"format": "password"},
    ),
]
SshKeyArg = Annotated[
    str | None, Field(description="Path of an SSH private key on the server (takes precedence over ssh_pwd)")
]
VmDirArg = Annotated[
    str | None, Field(description="VM storage directory on the host (default: the server's vm_dir, /var/lib/qemu)")
]

#: The host parameters of every tool, in the order of its input schema, and their defaults.
HOST_PARAMETERS: tuple[inspect.Parameter, ...] = tuple(
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
    for name, annotation, default in (
        ("host", HostArg, "localhost"),
        ("ssh_port", SshPortArg, 22),
        ("ssh_user", SshUserArg, None),
        ("ssh_pwd", SshPwdArg, None),
        ("ssh_key", SshKeyArg, None),
    )
)


def host_request(arguments: dict[str, Any]) -> HostRequest:
    """The :class:`HostRequest` of a call's arguments; the host parameters are taken out of ``arguments``."""
    return HostRequest(*(arguments.pop(p.name) for p in HOST_PARAMETERS))
