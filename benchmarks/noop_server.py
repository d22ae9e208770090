"""The transport floor: the same SDK, Starlette and uvicorn stack serving one tool that does nothing.

python -m benchmarks.noop_server --port 8765
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.routing import Mount


def noop() -> dict[str, object]:
    """Return an empty envelope."""
    return {"success": True, "message": "", "data": {}}


def build() -> Starlette:
    server: MCPServer[None] = MCPServer(name="noop")
    server.add_tool(noop)
    mcp_app = server.streamable_http_app(
        streamable_http_path="/mcp",
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with server.session_manager.run():
            yield

    return Starlette(routes=[Mount("/", app=mcp_app)], lifespan=lifespan)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(build(), host="127.0.0.1", port=args.port, log_level="warning", log_config=None)
