"""Commands and files inside a running guest, through its QEMU guest agent (``vm_guest``).

Everything goes over the VM's shared agent connection (:class:`..vm.qga.AgentPool`), locally or through the
pooled SSH connection.  What the agent answers is written by the guest: sizes are bounded and values kept
only when they have the expected shape.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
from collections.abc import Mapping
from typing import Any

from ..errors import GuestAgentError, GuestAgentUnavailable, InvalidInput
from ..vm.qga import GuestAgent, ReplyLimits, base64_length
from ..vm.vmdir import VMDir

__all__ = ["GuestOps"]

#: Bytes per guest-file-read / guest-file-write (base64 keeps each message well under the agent's limits).
CHUNK = 48 * 1024
#: Largest command line, and its longest argument.
MAX_ARGV_BYTES = 256 * 1024
MAX_ARGS = 4096
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_MODE = re.compile(r"0?[0-7]{3,4}")
_DISABLED_HINT = (
    "the guest agent has {command} disabled; enable it in the guest (e.g. remove it from BLOCK_RPCS / "
    "--block-rpcs in /etc/default/qemu-guest-agent or /etc/sysconfig/qemu-ga, or start qemu-ga with "
    "--allow-rpcs={command}) and restart qemu-guest-agent"
)


class GuestOps:
    """exec, read_file, write_file, info."""

    def __init__(self, vms: VMDir) -> None:
        self.vms = vms

    async def _agent_of(self, name: str) -> tuple[str, float]:
        """The agent socket of running VM ``name`` and the timeout of one agent exchange.

        :raise VMStateError: the VM is not running.
        """
        definition = await self.vms.load_running(name, "start it (wait='agent' returns once its guest agent answers)")
        return self.vms.store.paths(definition.name).qga_socket, self.vms.settings.qmp_timeout

    async def guest_exec(
        self, name: str, command: object, stdin: str | None, timeout: float, env: object = None
    ) -> dict[str, Any]:
        """Run ``command`` (an argv list, or a string for ``/bin/sh -c``) in the guest and wait for it.

        :raise InvalidInput: a malformed command, env, input or timeout.
        :raise GuestAgentUnavailable: no agent answers; :raise GuestAgentError: it refused (e.g. exec disabled).
        :raise OperationTimeout-like GuestAgentError: the command did not end within ``timeout``.
        """
        argv = _argv(command)
        limit = self.vms.settings.guest_output_limit
        environment = _environment(env)
        if not math.isfinite(timeout) or not 0 < timeout <= self.vms.settings.max_wait_timeout:
            raise InvalidInput(
                "timeout", f"{timeout!r} must be seconds above 0, at most {self.vms.settings.max_wait_timeout:g}"
            )
        arguments: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if environment:
            arguments["env"] = environment
        if stdin is not None:
            data = stdin.encode()
            if len(data) > self.vms.settings.guest_file_limit:
                raise InvalidInput("input", f"is larger than {self.vms.settings.guest_file_limit} bytes")
            arguments["input-data"] = base64.b64encode(data).decode()
        path, agent_timeout = await self._agent_of(name)
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with self.vms.shared.agents.session(self.vms.host, path, agent_timeout) as agent:
            started = await _call(agent, "guest-exec", arguments)
            pid = started.get("pid") if isinstance(started, dict) else None
            if not isinstance(pid, int):
                raise GuestAgentError("the guest agent answered guest-exec without a pid")
            status = await self._wait_exec(agent, pid, began + timeout, ReplyLimits.exec_status(limit))
        if status is None:
            raise GuestAgentError(
                f"the command did not end within {timeout:g} s; it may still run in the guest (pid {pid})",
                {"pid": pid, "seconds": round(loop.time() - began, 3)},
            )
        stdout, out_cut = _output(status.get("out-data"), limit)
        stderr, err_cut = _output(status.get("err-data"), limit)
        return {
            "exit_code": status.get("exitcode") if isinstance(status.get("exitcode"), int) else None,
            "signal": status.get("signal") if isinstance(status.get("signal"), int) else None,
            "stdout": stdout,
            "stderr": stderr,
            "stdout_truncated": out_cut or status.get("out-truncated") is True,
            "stderr_truncated": err_cut or status.get("err-truncated") is True,
            "seconds": round(loop.time() - began, 3),
        }

    async def _wait_exec(
        self, agent: GuestAgent, pid: int, deadline: float, limits: ReplyLimits
    ) -> dict[str, Any] | None:
        """Poll guest-exec-status with a backoff that starts at a millisecond (fast commands are fast); each
        answer is read within ``limits`` (its output kept up to ``--guest-output-limit``)."""
        loop = asyncio.get_running_loop()
        delay = 0.001
        while True:
            status = await _call(agent, "guest-exec-status", {"pid": pid}, limits)
            if isinstance(status, dict) and status.get("exited") is True:
                return status
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 0.1)

    async def guest_read_file(self, name: str, path: str, max_bytes: int | None) -> dict[str, Any]:
        """At most ``max_bytes`` (default and ceiling: ``--guest-file-limit``) of a guest file."""
        limit = self.vms.settings.guest_file_limit
        wanted = limit if max_bytes is None else max_bytes
        if isinstance(wanted, bool) or not 0 < wanted <= limit:
            raise InvalidInput("max_bytes", f"{max_bytes!r} must be 1 .. {limit}")
        guest_path = _guest_path(path)
        socket_path, timeout = await self._agent_of(name)
        data = bytearray()
        truncated = False
        async with self.vms.shared.agents.session(self.vms.host, socket_path, timeout) as agent:
            handle = await _call(agent, "guest-file-open", {"path": guest_path, "mode": "r"})
            if not isinstance(handle, int):
                raise GuestAgentError("the guest agent answered guest-file-open without a handle")
            try:
                while True:
                    count = min(CHUNK, wanted + 1 - len(data))
                    chunk = await _call(
                        agent, "guest-file-read", {"handle": handle, "count": count}, ReplyLimits.file_read(count)
                    )
                    if not isinstance(chunk, dict):
                        raise GuestAgentError("the guest agent answered guest-file-read with something else")
                    data += _unbase64(str(chunk.get("buf-b64", ""))[: base64_length(count)], "file data")[:count]
                    if len(data) > wanted:
                        truncated, data = True, data[:wanted]
                        break
                    if chunk.get("eof") is True or not chunk.get("count"):
                        break
            finally:
                await _call(agent, "guest-file-close", {"handle": handle})
        out: dict[str, Any] = {"path": guest_path, "size": len(data), "truncated": truncated}
        try:
            out["content"] = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            out["content_base64"] = base64.b64encode(bytes(data)).decode()
        return out

    async def guest_write_file(
        self, name: str, path: str, content: str | None, content_base64: str | None, mode: str | None, append: bool
    ) -> dict[str, Any]:
        """Write (or append to) a guest file, then ``chmod`` it when ``mode`` is given."""
        guest_path = _guest_path(path)
        if (content is None) == (content_base64 is None):
            raise InvalidInput("content", "give exactly one of content (text) and content_base64")
        if content is not None:
            data = content.encode()
        else:
            try:
                data = base64.b64decode(content_base64 or "", validate=True)
            except ValueError as exc:
                raise InvalidInput("content_base64", "is not valid base64") from exc
        if len(data) > self.vms.settings.guest_file_limit:
            raise InvalidInput("content", f"is larger than {self.vms.settings.guest_file_limit} bytes")
        if mode is not None and not _MODE.fullmatch(mode):
            raise InvalidInput("mode", f"{mode!r} is not an octal file mode; use e.g. '0644' or '755'")
        socket_path, timeout = await self._agent_of(name)
        async with self.vms.shared.agents.session(self.vms.host, socket_path, timeout) as agent:
            handle = await _call(agent, "guest-file-open", {"path": guest_path, "mode": "a" if append else "w"})
            if not isinstance(handle, int):
                raise GuestAgentError("the guest agent answered guest-file-open without a handle")
            try:
                for start in range(0, len(data), CHUNK):
                    piece = base64.b64encode(data[start : start + CHUNK]).decode()
                    await _call(agent, "guest-file-write", {"handle": handle, "buf-b64": piece})
            finally:
                await _call(agent, "guest-file-close", {"handle": handle})
        out: dict[str, Any] = {"path": guest_path, "bytes_written": len(data), "appended": append}
        if mode is not None:
            result = await self.guest_exec(name, ["chmod", mode, "--", guest_path], None, 30.0)
            if result["exit_code"] != 0:
                raise GuestAgentError(f"the file was written, but chmod {mode} failed: {result['stderr'][:300]}")
            out["mode"] = mode
        return out

    async def guest_info(self, name: str) -> dict[str, Any]:
        """What the agent says of itself and the guest; a part it does not support is ``None``."""
        socket_path, timeout = await self._agent_of(name)
        out: dict[str, Any] = {}
        async with self.vms.shared.agents.session(self.vms.host, socket_path, timeout) as agent:
            for key, command in (
                ("agent", "guest-info"),
                ("os", "guest-get-osinfo"),
                ("hostname", "guest-get-host-name"),
                ("interfaces", "guest-network-get-interfaces"),
                ("filesystems", "guest-get-fsinfo"),
                ("users", "guest-get-users"),
            ):
                try:
                    out[key] = await agent.execute(command)
                except GuestAgentUnavailable:
                    raise
                except GuestAgentError as exc:
                    out[key] = None
                    out.setdefault("unavailable", {})[key] = exc.message
        return _shape_info(out)


async def _call(agent: GuestAgent, command: str, arguments: dict[str, Any], limits: ReplyLimits | None = None) -> Any:
    try:
        return await agent.execute(command, arguments, limits=limits)
    except GuestAgentError as exc:
        if isinstance(exc, GuestAgentUnavailable):
            raise
        if "disabled" in exc.message or "has been disabled" in exc.message:
            raise GuestAgentError(_DISABLED_HINT.format(command=command)) from exc
        raise


def _argv(command: object) -> list[str]:
    """:raise InvalidInput: not a non-empty list of strings (or a string for the shell), or too long."""
    if isinstance(command, str):
        argv = ["/bin/sh", "-c", command]
    elif isinstance(command, list) and command and all(isinstance(a, str) for a in command):
        argv = list(command)
    else:
        raise InvalidInput("command", "give an argv list such as ['uname', '-a'], or a string run with /bin/sh -c")
    if not argv[0] or len(argv) > MAX_ARGS or sum(len(a.encode()) for a in argv) > MAX_ARGV_BYTES:
        raise InvalidInput(
            "command", f"must name a program and hold at most {MAX_ARGS} arguments, {MAX_ARGV_BYTES} bytes"
        )
    if any("\0" in a for a in argv):
        raise InvalidInput("command", "may not hold NUL characters")
    return argv


def _environment(env: object) -> list[str]:
    if env is None:
        return []
    if not isinstance(env, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise InvalidInput("env", "give an object of variable names to string values, e.g. {'LANG': 'C.UTF-8'}")
    bad = [k for k in env if not _ENV_NAME.fullmatch(k)]
    if bad or any("\0" in v for v in env.values()):
        raise InvalidInput("env", f"{bad[:3]!r} are not variable names (or a value holds NUL)")
    return [f"{k}={v}" for k, v in env.items()]


def _guest_path(path: object) -> str:
    if not isinstance(path, str) or not path or len(path) > 4096 or "\0" in path:
        raise InvalidInput("path", "give the file's path in the guest, e.g. /etc/hostname")
    return path


def _output(data: object, limit: int) -> tuple[str, bool]:
    """Decoded guest output (UTF-8 with replacement), cut at ``limit`` bytes.

    :raise GuestAgentError: the output is not base64.
    """
    if not isinstance(data, str):
        return "", False
    window = base64_length(limit) + 4  # whole base64 groups, one more than ``limit`` needs: a cut shows
    raw = _unbase64(data[:window], "command output")
    return raw[:limit].decode("utf-8", errors="replace"), len(raw) > limit or len(data) > window


def _unbase64(text: str, what: str) -> bytes:
    """:raise GuestAgentError: ``text`` is not base64 (the guest's agent sent something else)."""
    try:
        return base64.b64decode(text, validate=False)
    except ValueError as exc:
        raise GuestAgentError(f"the guest agent sent {what} that is not base64") from exc


def _shape_info(raw: dict[str, Any]) -> dict[str, Any]:
    """The agent's answers, bounded (the guest writes them)."""
    agent = _dict(raw.get("agent"))
    commands = _list(agent.get("supported_commands"))
    enabled = sorted(
        str(c["name"])[:64] for c in commands[:512] if isinstance(c, dict) and c.get("enabled") and c.get("name")
    )
    osinfo = _dict(raw.get("os"))
    hostname = _dict(raw.get("hostname"))
    out: dict[str, Any] = {
        "agent_version": str(agent.get("version", ""))[:64] or None,
        "enabled_commands": enabled,
        "exec_enabled": "guest-exec" in enabled,
        "os": {
            k: str(osinfo[k])[:200]
            for k in ("name", "pretty-name", "version", "kernel-release", "machine")
            if k in osinfo
        },
        "hostname": str(hostname.get("host-name", ""))[:200] or None,
        "interfaces": _interfaces(raw.get("interfaces")),
        "filesystems": _filesystems(raw.get("filesystems")),
        "users": [str(u.get("user"))[:64] for u in _list(raw.get("users"))[:64] if isinstance(u, dict)],
    }
    if raw.get("unavailable"):
        out["unavailable"] = raw["unavailable"]
    return out


def _interfaces(raw: object) -> list[dict[str, Any]]:
    out = []
    for entry in raw[:64] if isinstance(raw, list) else []:
        if not isinstance(entry, dict):
            continue
        addresses = _list(entry.get("ip-addresses"))
        out.append(
            {
                "name": str(entry.get("name", ""))[:32],
                "mac": str(entry.get("hardware-address", ""))[:32] or None,
                "addresses": [
                    f"{a.get('ip-address')}/{a.get('prefix')}"
                    for a in addresses[:32]
                    if isinstance(a, dict) and isinstance(a.get("ip-address"), str) and len(a["ip-address"]) <= 64
                ],
            }
        )
    return out


def _filesystems(raw: object) -> list[dict[str, Any]]:
    out = []
    for entry in raw[:64] if isinstance(raw, list) else []:
        if isinstance(entry, dict):
            out.append(
                {
                    "mountpoint": str(entry.get("mountpoint", ""))[:200],
                    "type": str(entry.get("type", ""))[:32],
                    "total_bytes": entry.get("total-bytes") if isinstance(entry.get("total-bytes"), int) else None,
                    "used_bytes": entry.get("used-bytes") if isinstance(entry.get("used-bytes"), int) else None,
                }
            )
    return out


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
