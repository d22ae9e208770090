"""A guest agent's answers are read within what the command needs, whatever the guest sends.

A fake agent (``tests/fakeagent.py``, a process of its own) forges the answers a hostile guest could write on
its agent channel, on a real unix socket; the server's client (:mod:`qemu_mcp_http.vm.qga`) reads them.  Before
issue 23, each answer line up to 32 MiB was parsed whole: ``{"return":[{},{},...]}`` made ``json.loads`` grow
the server by about 740 MiB.  Memory is measured here with ``tracemalloc`` (the client's allocations only).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest

from qemu_mcp_http.errors import GuestAgentError, GuestAgentReplyRefused, GuestAgentUnavailable
from qemu_mcp_http.guest.ops import _output
from qemu_mcp_http.hosts.local import LocalHost
from qemu_mcp_http.vm.qga import AgentPool, ReplyLimits, ReplyScanner, guest_agent

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def fake_agent(tmp_path: Path, mode: str) -> Iterator[str]:
    path = str(tmp_path / f"{mode}.sock")
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakeagent", path, mode], cwd=ROOT)
    try:
        deadline = time.monotonic() + 10
        while not Path(path).exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the fake agent did not start"
            time.sleep(0.02)
        yield path
    finally:
        proc.kill()
        proc.wait(10)


async def _peak_while(work: Awaitable[object]) -> tuple[GuestAgentError | None, int]:
    """Run ``work``; the agent error it raised and the peak of memory allocated meanwhile (bytes)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    raised: GuestAgentError | None = None
    try:
        await work
    except GuestAgentError as exc:
        raised = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return raised, peak


async def test_a_reply_of_millions_of_elements_is_refused_within_a_few_mib(tmp_path: Path) -> None:
    """The issue's reply: just under 32 MiB of ``{},`` on one line, to ``guest-info`` (a read token's call)."""
    with fake_agent(tmp_path, "elements") as path:
        async with guest_agent(LocalHost(), path, timeout=20) as agent:
            raised, peak = await _peak_while(agent.execute("guest-info"))
    assert isinstance(raised, GuestAgentReplyRefused), raised
    assert "more than 50000 JSON elements" in str(raised.message) or "longer than" in str(raised.message)
    assert "guest-info" in raised.message
    assert peak < 8 << 20, f"the client's memory peaked at {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize(
    ("mode", "words"), [("long-line", "is longer than 1048576 bytes"), ("many-numbers", "more than 50000 JSON")]
)
async def test_over_long_or_over_full_lines_are_refused_and_the_channel_dropped(
    tmp_path: Path, mode: str, words: str
) -> None:
    """A 40 MiB line and a short line of 300,000 numbers are refused with a clear error; the pool drops the
    channel (the rest of the line is never read), and the next call connects afresh and works."""
    pool = AgentPool()
    host = LocalHost()
    try:
        with fake_agent(tmp_path, mode) as path:
            with pytest.raises(GuestAgentReplyRefused, match=words) as refused:
                async with pool.session(host, path, 20) as agent:
                    await agent.execute("guest-get-fsinfo")
            assert "the channel was dropped" in refused.value.message
            assert isinstance(refused.value, GuestAgentUnavailable)  # the pool's signal to drop it
            async with pool.session(host, path, 20) as agent:
                assert await agent.execute("guest-ping") == {}
    finally:
        await pool.aclose()


async def test_exec_output_beyond_the_limit_is_cut_not_parsed_whole(tmp_path: Path) -> None:
    """3 MiB of stdout from qemu-ga (it captures up to 16 MiB) with --guest-output-limit 64 KiB: the answer is
    read, but only the limit's worth of base64 is kept; the output comes back cut, and says so."""
    limit = 64 << 10
    with fake_agent(tmp_path, "big-output") as path:
        async with guest_agent(LocalHost(), path, timeout=20) as agent:
            tracemalloc.start()
            status = await agent.execute("guest-exec-status", {"pid": 1}, limits=ReplyLimits.exec_status(limit))
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    stdout, cut = _output(status["out-data"], limit)
    assert stdout == "y" * limit and cut is True
    assert status["exitcode"] == 0 and status["exited"] is True
    assert peak < 2 << 20, f"the client's memory peaked at {peak / 2**20:.1f} MiB"


async def test_junk_left_in_the_channel_is_flushed_by_the_sync(tmp_path: Path) -> None:
    """Half a line an earlier client left unread is skipped while synchronising, not taken for an answer."""
    with fake_agent(tmp_path, "junk-first") as path:
        async with guest_agent(LocalHost(), path, timeout=10) as agent:
            assert await agent.execute("guest-info") == {"version": "forged"}


def test_output_that_is_not_base64_is_a_clear_error() -> None:
    """Before: a cut at a length that is not a whole base64 group made an internal error of any output
    longer than the limit."""
    for limit in range(1000, 1010):
        text, cut = _output("eHl6" * 1000, limit)
        assert len(text) == limit and cut is True
    with pytest.raises(GuestAgentError, match="not base64"):
        _output("eHl6e", 10)


def _scan(line: bytes, limits: ReplyLimits, piece: int = 7) -> bytes:
    scanner = ReplyScanner(limits, "guest-test")
    for start in range(0, len(line), piece):
        used = scanner.feed(line[start : start + piece])
        if used is not None:
            return scanner.text()
    raise AssertionError("the line did not end")


def test_the_scanner_keeps_json_whole_when_it_cuts_strings() -> None:
    """Strings are cut at a whole character and a whole escape, in whatever pieces the line arrives."""
    import json

    limits = ReplyLimits(string_bytes=10)
    line = json.dumps(
        {"a": "é" * 20, "b": "\\u00e9x" * 5, "c": 'q"uote\\', "d": [1, 2, {"e": None}]}, ensure_ascii=False
    ).encode()
    for piece in (1, 2, 3, 7, 64):
        parsed = json.loads(_scan(line + b"\nrest", limits, piece))
        assert parsed["a"] == "é" * 5  # 10 bytes of 2-byte characters
        assert parsed["b"].startswith("\\u00e9x")
        assert parsed["c"] == 'q"uote\\' and parsed["d"] == [1, 2, {"e": None}]
    ascii_escape = json.dumps({"s": "\u00e9" * 9}, ensure_ascii=True).encode()  # \u00e9: 6 bytes each
    assert json.loads(_scan(ascii_escape + b"\n", limits, 5)) == {"s": "é"}
    scanner = ReplyScanner(ReplyLimits(), "x")
    assert scanner.feed(b'{"a":1}\n{"b"') == 8 and scanner.text() == b'{"a":1}'
