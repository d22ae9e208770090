"""The MCP tools: one module each, thin over the VM operations (:mod:`qemu_mcp_http.vm.manager`), each declared by
its ``TOOL = ToolSpec(...)`` (see :mod:`.spec`) and registered from ``TOOLS``."""

from .list_vms import TOOL as LIST_VMS
from .manage_vm import TOOL as MANAGE_VM
from .monitor_vm_status import TOOL as MONITOR_VM_STATUS
from .spec import ToolSpec
from .vm_console import TOOL as VM_CONSOLE
from .vm_guest import TOOL as VM_GUEST
from .vm_snapshot import TOOL as VM_SNAPSHOT

__all__ = ["TOOLS", "ToolSpec"]

#: The tools this server offers, in the order ``tools/list`` shows them.
TOOLS: tuple[ToolSpec, ...] = (MANAGE_VM, LIST_VMS, MONITOR_VM_STATUS, VM_GUEST, VM_CONSOLE, VM_SNAPSHOT)
