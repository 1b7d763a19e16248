#!/usr/bin/env node
/**
 * A stand-in for `npx convex deploy`, for the local Convex backend (server.mjs): run in
 * an app's folder (the one holding `convex/`), it makes the deployment load that folder's
 * current schema and functions, keeping its data, as a real deploy does.
 *
 *   CONVEX_SELF_HOSTED_URL=<base> CONVEX_SELF_HOSTED_ADMIN_KEY=<key> node deploy.mjs
 *
 * It reads the deployment and its key the way the convex CLI does (from the
 * environment: never from its arguments), prints what happened, and exits 1 when the
 * deploy is refused (a wrong key, a schema the existing documents do not match, a
 * function that does not build). `--fail` makes it fail without deploying, and so does
 * a deployment named in CONVEX_LOCAL_FAIL_DEPLOY (comma-separated names; tests).
 */
const url = process.env.CONVEX_SELF_HOSTED_URL;
const key = process.env.CONVEX_SELF_HOSTED_ADMIN_KEY ?? process.env.CONVEX_DEPLOY_KEY;
if (process.argv.includes("--fail")) {
  console.error("deploy.mjs: failing as asked (--fail): the schema was not pushed");
  process.exit(1);
}
const failFor = (process.env.CONVEX_LOCAL_FAIL_DEPLOY ?? "").split(",").filter(Boolean);
if (url && failFor.some((name) => url.endsWith(`/d/${name}`))) {
  console.error(`deploy.mjs: failing as asked (CONVEX_LOCAL_FAIL_DEPLOY): schema not pushed`);
  process.exit(1);
}
if (!url || !key) {
  console.error("deploy.mjs: CONVEX_SELF_HOSTED_URL and CONVEX_SELF_HOSTED_ADMIN_KEY are required");
  process.exit(2);
}
let response;
try {
  response = await fetch(`${url}/_deploy`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Convex ${key}` },
    body: JSON.stringify({ appDir: process.cwd() }),
  });
} catch (error) {
  console.error(`deploy.mjs: ${url} is unreachable: ${error.cause?.code ?? error.message}`);
  process.exit(1);
}
const answer = await response.json().catch(() => ({}));
if (!response.ok) {
  console.error(`deploy.mjs: deploy refused (HTTP ${response.status}): ${answer.code}: ${answer.message}`);
  process.exit(1);
}
console.log(`deploy.mjs: deployed ${process.cwd()} to ${url} (deploy ${answer.deploys ?? "?"})`);
