"""``vm_guest``: commands and files inside a running guest, through its QEMU guest agent."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp_types import CallToolResult, ToolAnnotations
from pydantic import Field

from ...errors import InvalidInput
from ..confirm import Asking, Decision, NotAsked
from .call import Action, Call
from .params import VmDirArg
from .spec import ToolSpec

__all__ = ["ANNOTATIONS", "DESCRIPTION", "TOOL", "vm_guest"]

DESCRIPTION = """Run commands and move files inside a running VM through its QEMU guest agent (qemu-guest-agent in
the guest; locally or over SSH). Actions: exec (command: an argv list, or a string run with /bin/sh -c; optional
input (stdin), env, timeout; returns exit_code, stdout, stderr, seconds), read_file (path, max_bytes), write_file
(path, content or content_base64, mode, append), info (agent version and enabled commands, OS, hostname,
interfaces, filesystems, users). Every call is audited (the command and path, never input or file contents)."""

ANNOTATIONS = ToolAnnotations(
    title="Commands and files in a VM", read_only_hint=False, destructive_hint=True, idempotent_hint=False,
    open_world_hint=False,
)  # fmt: skip

ActionName = Literal["exec", "read_file", "write_file", "info"]


async def vm_guest(
    call: Call,
    name: Annotated[str, Field(description="Name of the running VM")],
    action: Annotated[ActionName, Field(description="exec, read_file, write_file or info")],
    command: Annotated[
        list[str] | str | None,
        Field(description="exec: argv list such as ['uname', '-a'], or a string run with /bin/sh -c"),
    ] = None,
    input: Annotated[str | None, Field(description="exec: text fed to the command's stdin")] = None,
    timeout: Annotated[
        float, Field(description="exec: seconds the command may run (default 60)", gt=0, allow_inf_nan=False)
    ] = 60.0,
    env: Annotated[dict[str, str] | None, Field(description="exec: environment variables")] = None,
    path: Annotated[str | None, Field(description="read_file/write_file: the file's path in the guest")] = None,
    max_bytes: Annotated[int | None, Field(description="read_file: at most this many bytes", gt=0)] = None,
    content: Annotated[str | None, Field(description="write_file: the text to write (UTF-8)")] = None,
    content_base64: Annotated[str | None, Field(description="write_file: bytes to write, base64")] = None,
    mode: Annotated[str | None, Field(description="write_file: octal mode set after writing, e.g. '0644'")] = None,
    append: Annotated[bool, Field(description="write_file: append instead of replacing")] = False,
    vm_dir: VmDirArg = None,
) -> CallToolResult:
    async def work() -> tuple[str, dict[str, Any]]:
        async with call.app.vms(call.request, vm_dir, name=name) as vms:
            if action == "exec":
                if command is None:
                    raise InvalidInput("command", "exec needs a command, e.g. ['uname', '-a'] or 'ls -l /'")
                result = await vms.guest_exec(name, command, input, timeout, env)
                return f"command exited with {result['exit_code']} in {result['seconds']} s", result
            if action == "info":
                info = await vms.guest_info(name)
                return f"guest agent {info.get('agent_version')} of {name} answers", info
            if path is None:
                raise InvalidInput("path", f"{action} needs the file's path in the guest")
            if action == "read_file":
                read = await vms.guest_read_file(name, path, max_bytes)
                return f"read {read['size']} bytes of {path}", read
            written = await vms.guest_write_file(name, path, content, content_base64, mode, append)
            return f"wrote {written['bytes_written']} bytes to {path}", written

    # The audit names the command or the file, never what goes in or out.
    shown = command if isinstance(command, str) else " ".join(command) if command else None
    base = call.base(vm_name=name, action=action)
    return await call.run(work(), base, vm=name, command=shown[:300] if shown else None, path=path)


async def confirm_write(asking: Asking) -> Decision:
    arguments = asking.arguments
    name, path = arguments["name"], arguments.get("path")
    if path is None:
        return NotAsked("not destructive")
    content, content_base64, append = arguments.get("content"), arguments.get("content_base64"), arguments["append"]
    size = len(content.encode()) if content is not None else (len(content_base64 or "") * 3) // 4
    how = "append about" if append else "replace the file with about"
    text = f"Write to {path} in the guest of VM {name} {asking.where} ({how} {size} bytes)? An existing file's content "
    text += "is kept and extended." if append else "is lost."
    return await asking.ask(f"writing {path} in VM {name}", text)


TOOL = ToolSpec(
    "vm_guest",
    vm_guest,
    DESCRIPTION,
    ANNOTATIONS,
    actions={
        "info": Action("read", audit="guest-info"),
        "exec": Action("admin", audit="guest-exec"),
        # read_file reads any guest file as root (keys, shadow): as exec.
        "read_file": Action("admin", audit="guest-read_file"),
        "write_file": Action("admin", audit="guest-write_file", confirm=confirm_write),
    },
)
