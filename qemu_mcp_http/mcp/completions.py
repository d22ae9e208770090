"""Completion of the resource templates' arguments: the hosts (``localhost`` and the named hosts the caller's
token reaches) and the VM names of a host's default vm_dir."""

from __future__ import annotations

from collections.abc import Callable

from mcp_types import Completion, CompletionArgument, CompletionContext, PromptReference, ResourceTemplateReference

from ..errors import QemuMcpError
from ..fleet.targets import HostRequest
from .context import AppContext

__all__ = ["MAX_VALUES", "Completions"]

#: Values in one completion (the total says how many there are).
MAX_VALUES = 100


class Completions:
    """``completion/complete`` for the ``vm://`` templates; ``hosts()`` are the hosts the caller may reach."""

    def __init__(self, app: AppContext, hosts: Callable[[], list[str]]) -> None:
        self.app = app
        self.hosts = hosts

    async def complete(
        self,
        ref: ResourceTemplateReference | PromptReference,
        argument: CompletionArgument,
        context: CompletionContext | None,
    ) -> Completion | None:
        if not isinstance(ref, ResourceTemplateReference) or not ref.uri.startswith("vm://"):
            return None
        prefix = argument.value
        if argument.name == "host":
            values = [h for h in self.hosts() if h.startswith(prefix)]
        elif argument.name == "name":
            host = ((context.arguments if context else None) or {}).get("host") or "localhost"
            values = await self._vm_names(host, prefix)
        else:
            return None
        return Completion(values=values[:MAX_VALUES], total=len(values), has_more=len(values) > MAX_VALUES)

    async def _vm_names(self, host: str, prefix: str) -> list[str]:
        """The VM names of ``host`` that begin with ``prefix``; none for a host out of reach or that fails."""
        if host not in self.hosts():
            return []
        request = HostRequest() if host == "localhost" else HostRequest(host=host)
        try:
            async with self.app.vms(request, None) as vms:
                scanned, _, _ = await vms.store.scan()
        except QemuMcpError:
            return []
        return sorted(d.name for d, _ in scanned if d.name.startswith(prefix))
