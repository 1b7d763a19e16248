// Calls a deployment with Convex's own ConvexHttpClient and admin auth, as the Convex CLI
// does (`npx convex run` uses client.function(...) for any function, internal included).
//
// argv[2]: the deployment URL. stdin: {"key": deploy key, "calls": [{"kind": "query" |
// "mutation" | "action" | "function", "path", "args": Convex JSON, "componentPath"?}]}.
// stdout: [{"ok": true, "json": convexToJson(result)} | {"ok": false, "error": "..."}].
import { ConvexHttpClient } from "convex/browser";
import { convexToJson, jsonToConvex } from "convex/values";

let input = "";
for await (const chunk of process.stdin) {
  input += chunk;
}
const { key, calls } = JSON.parse(input);
const client = new ConvexHttpClient(process.argv[2], { logger: false });
client.setAdminAuth(key);

const results = [];
for (const call of calls) {
  const args = jsonToConvex(call.args);
  try {
    let value;
    if (call.kind === "function") {
      value = await client.function(call.path, call.componentPath ?? undefined, args);
    } else {
      value = await client[call.kind](call.path, args);
    }
    results.push({ ok: true, json: convexToJson(value) });
  } catch (error) {
    results.push({ ok: false, error: String(error?.message ?? error) });
  }
}
process.stdout.write(JSON.stringify(results) + "\n");
