"""The tools as clients see them in ``tools/list`` (names, descriptions, annotations, input schemas), pinned to a
recorded file: a refactoring of the tools must not change what clients are told, down to the order of the
properties. After a deliberate change, rewrite the file with ``QEMU_MCP_RECORD_TOOLS=1`` and review its diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .inprocess import InProcess
from .support import ToolClient

RECORDED = Path(__file__).parent / "data" / "tools-list.json"


async def test_tools_list_is_the_recorded_one(inproc: InProcess, inproc_tools: ToolClient) -> None:
    """Every tool's schema, as the real client reads it over HTTP, equals the recording (text and key order)."""
    listed = await inproc_tools.client.list_tools()
    tools = [tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in listed.tools]
    text = json.dumps(tools, indent=1) + "\n"
    if os.environ.get("QEMU_MCP_RECORD_TOOLS") == "1":
        RECORDED.write_text(text)
    assert text == RECORDED.read_text(), "tools/list changed; if on purpose, record it again (see the docstring)"
