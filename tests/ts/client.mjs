// The TypeScript MCP SDK as a second, independent client of qemu-mcp-http (driven by tests/test_ts_client.py).
//
//   node client.mjs <server /mcp URL> <VM name> [timeout seconds, default 60]
//
// Connects over streamable HTTP; lists the resources (every page), the resource templates; reads the VM's
// resource (JSON) and its console; completes the template's `name` argument; subscribes to the VM's resource.
// Prints one JSON line per event on stdout:
//   {"event":"ready", ...what it saw}           then waits (up to the timeout) for resources/updated of the VM
//   {"event":"updated","uri":...,"ms_after_ready":...}
//   {"event":"after","status":...}              the VM's resource read again
// and exits 0; on a timeout or an error it prints {"event":"error","stage":...,"message":...} and exits 1.
// Whatever happens, the session is terminated (HTTP DELETE) before the client closes.

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import {
    ResourceListChangedNotificationSchema,
    ResourceUpdatedNotificationSchema,
} from "@modelcontextprotocol/sdk/types.js";

const TEMPLATE = "vm://{host}/{name}";

function emit(event) {
    process.stdout.write(JSON.stringify(event) + "\n");
}

async function finish(code) {
    await new Promise((resolve) => process.stdout.write("", resolve));
    process.exit(code);
}

const [url, name, timeoutArg] = process.argv.slice(2);
if (!url || !name) {
    emit({ event: "error", stage: "arguments", message: "usage: node client.mjs <url> <vm name> [timeout s]" });
    await finish(2);
}
const timeoutMs = Number(timeoutArg ?? "60") * 1000;
const uri = `vm://localhost/${name}`;

const client = new Client({ name: "qemu-mcp-http-ts-test", version: "1.0.0" });
const transport = new StreamableHTTPClientTransport(new URL(url));
// Transport errors outside a request (e.g. the notification stream) go to stderr; requests fail on their own.
client.onerror = (error) => process.stderr.write(`client error: ${error?.stack ?? error}\n`);

let readyAt = null;
const early = []; // resources/updated before "ready": reported, not awaited
const listChanged = [];
let onUpdated = null;
client.setNotificationHandler(ResourceUpdatedNotificationSchema, (notification) => {
    const at = performance.now();
    if (readyAt === null) {
        early.push(notification.params.uri);
    } else if (onUpdated) {
        onUpdated(notification.params.uri, at);
    }
});
client.setNotificationHandler(ResourceListChangedNotificationSchema, () => {
    listChanged.push(readyAt === null ? null : Math.round(performance.now() - readyAt));
});

function parseVM(result) {
    const [content] = result.contents;
    return { mimeType: content.mimeType, vm: JSON.parse(content.text) };
}

let stage = "connect";
let code = 1;
try {
    await client.connect(transport);
    const server = client.getServerVersion();
    const capabilities = client.getServerCapabilities();

    stage = "list resources";
    const resources = [];
    let pages = 0;
    let cursor;
    do {
        const page = await client.listResources(cursor === undefined ? {} : { cursor });
        pages += 1;
        resources.push(...page.resources.map((r) => r.uri));
        cursor = page.nextCursor;
    } while (cursor !== undefined && pages < 1000);

    stage = "list templates";
    const templates = (await client.listResourceTemplates()).resourceTemplates.map((t) => t.uriTemplate);

    stage = "read";
    const first = parseVM(await client.readResource({ uri }));

    stage = "read console";
    const consoleResult = await client.readResource({ uri: `${uri}/console` });

    stage = "complete";
    const completion = await client.complete({
        ref: { type: "ref/resource", uri: TEMPLATE },
        argument: { name: "name", value: "" },
        context: { arguments: { host: "localhost" } },
    });

    stage = "subscribe";
    await client.subscribeResource({ uri });

    const updated = new Promise((resolve, reject) => {
        const timer = setTimeout(
            () => reject(new Error(`no notifications/resources/updated for ${uri} within ${timeoutMs / 1000} s`)),
            timeoutMs,
        );
        onUpdated = (updatedUri, at) => {
            if (updatedUri === uri) {
                clearTimeout(timer);
                resolve(at);
            }
        };
    });
    emit({
        event: "ready",
        protocol_version: transport.protocolVersion,
        session: transport.sessionId !== undefined,
        server,
        resource_capabilities: capabilities?.resources ?? null,
        resources,
        pages,
        templates,
        mime_type: first.mimeType,
        vm: first.vm,
        console_mime_type: consoleResult.contents[0].mimeType,
        console: consoleResult.contents[0].text,
        completion: completion.completion,
        updates_before_ready: early,
    });
    readyAt = performance.now();

    stage = "wait for updated";
    const at = await updated;
    emit({ event: "updated", uri, ms_after_ready: Math.round(at - readyAt) });

    stage = "read after";
    const after = parseVM(await client.readResource({ uri }));
    emit({ event: "after", status: after.vm.status, vm: after.vm, list_changed_ms_after_ready: listChanged });
    code = 0;
} catch (error) {
    emit({ event: "error", stage, message: String(error?.message ?? error), code: error?.code ?? null });
} finally {
    try {
        await transport.terminateSession(); // the server drops the session (and its subscription) at once
    } catch (error) {
        process.stderr.write(`terminateSession: ${error?.message ?? error}\n`);
    }
    await client.close();
}
await finish(code);
