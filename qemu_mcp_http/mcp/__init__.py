"""The MCP face: the server, its tools, resources, confirmations and scopes."""
