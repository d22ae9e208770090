"""``monitor_vm_status``: samples of a running VM, each streamed as an MCP progress notification."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from mcp_types import CallToolResult, ToolAnnotations
from pydantic import Field

from ...errors import QemuMcpError
from ...monitoring.monitor import MonitorRun, monitor_vm
from ..calls import client_identity
from .call import Action, Call
from .params import VmDirArg
from .spec import ToolSpec

__all__ = ["ANNOTATIONS", "DESCRIPTION", "TOOL", "monitor_vm_status"]

DESCRIPTION = """Sample CPU, memory, disk and network of a running VM every `interval` seconds, `count` times
(0: until the client cancels). Each sample is sent as an MCP progress notification (message = the sample as
JSON) the moment it is taken; the result holds all timestamps and samples. Rates are per second over the
interval (the first sample: since the VM started)."""

ANNOTATIONS = ToolAnnotations(
    title="Monitor a QEMU VM", read_only_hint=True, destructive_hint=False, idempotent_hint=False, open_world_hint=False
)


async def monitor_vm_status(
    call: Call,
    name: Annotated[str, Field(description="Name of the running VM to monitor")],
    metrics: Annotated[
        Literal["all", "cpu", "memory", "disk", "network"], Field(description="Which metrics to sample")
    ] = "all",
    interval: Annotated[float, Field(description="Seconds between samples (minimum 1)", allow_inf_nan=False)] = 5,
    count: Annotated[int, Field(description="Number of samples; 0 samples until the client cancels")] = 1,
    vm_dir: VmDirArg = None,
) -> CallToolResult:
    app = call.app
    run = MonitorRun()

    async def on_sample(n: int, sample: dict[str, Any]) -> None:
        await call.ctx.report_progress(n, count or None, json.dumps(sample, separators=(",", ":")))

    def collected() -> dict[str, Any]:
        return {
            "metrics": metrics,
            "interval": interval,
            "count": len(run.samples),
            "timestamp": [s["timestamp"] for s in run.samples],
            "metrics_data": run.samples,
            "max_lateness_s": round(run.max_lateness_s, 4),
        }

    async def work() -> tuple[str, dict[str, Any]]:
        settings = app.settings
        client = client_identity(call.ctx)
        with app.monitor_streams.slot(client, settings.max_monitor_streams_per_client, settings.max_monitor_streams):
            async with app.vms(call.request, vm_dir, name=name) as vms:
                try:
                    # count=0 never ends by itself: a server shutdown ends it, with an error the client sees.
                    await app.shutdown.cancel_on_shutdown(
                        monitor_vm(vms.dir, name, metrics, interval, count, on_sample, run)
                    )
                except QemuMcpError as exc:
                    if run.samples:
                        n = len(run.samples)
                        exc.message += f" (after {n} sample{'s' if n != 1 else ''})"
                    raise
        n = len(run.samples)
        note = " (stopped at the server's maximum duration)" if run.ended_by == "max_duration" else ""
        return f"Successfully obtained {n} sampling data point{'s' if n != 1 else ''} for {name}{note}", collected()

    result = await call.run(work(), call.base(vm_name=name))
    if result.is_error and run.samples and result.structured_content is not None:
        # Keep what was collected before the failure.
        result.structured_content["data"].update(collected())
        result.content[0].text = json.dumps(result.structured_content, separators=(",", ":"))  # type: ignore[union-attr]
    return result


TOOL = ToolSpec("monitor_vm_status", monitor_vm_status, DESCRIPTION, ANNOTATIONS, actions={None: Action("read")})
