"""The MCP tools: one module each, thin wrappers over :mod:`qemu_mcp_http.vm`."""
