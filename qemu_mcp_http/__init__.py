"""qemu-mcp-http: an MCP server, over streamable HTTP, that manages QEMU VMs locally and over SSH."""

from .version import __version__

__all__ = ["__version__"]
