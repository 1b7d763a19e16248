#!/usr/bin/env node
/**
 * A local stand-in for Convex deployments, for byod's tests and benchmarks: it runs an
 * app's REAL Convex functions on Convex's own JS test backend (`convex-test`) behind
 * Convex's HTTP API, several deployments in one process.
 *
 *   BYOD_CONVEX_ADMIN_TOKEN=... node server.mjs [--port 0]
 *       [--admin-token T] [--latency-ms N] [--work-dir D] [--exit-with-stdin]
 *
 * Its first line on stdout is `{"port": N}` (the port it listens on, 127.0.0.1 only);
 * nothing else is ever written to stdout. Diagnostics go to stderr, never a deploy key or
 * the admin token.
 *
 * Deployments. Each lives under `http://127.0.0.1:N/d/<name>` (its base URL) with its own
 * convex-test instance (its own in-memory data), its own deploy key, and the app folder
 * it runs (the folder holding `convex/`). The app's `convex/*.ts` are transpiled with
 * esbuild to ES modules in a temporary folder, one module per file as Convex does.
 *
 * Convex's HTTP API, per deployment (POST, JSON body):
 *   <base>/api/query|mutation|action  {"path": "module:function", "args": [{...}] or {...},
 *                                      "format": "convex_encoded_json" | "json"}
 *   <base>/api/function                {"path", "args": {...}, "format", "componentPath"}
 *   200 {"status": "success", "value": <value>, "logLines": [...]}
 *   560 {"status": "error", "errorMessage": "...", "errorData"?: <value>, "logLines": [...]}
 *       when the function throws, its arguments or result fail validation, or (as the
 *       real backend answers) the function does not exist or is internal and the caller
 *       is not admin: "Could not find public function for 'x'. Did you forget ...".
 *   401 {"code": "BadAdminKey", "message": ...}    `Authorization: Convex <wrong key>`
 *   401 {"code": "NoAuthProvider", ...}           `Authorization: Bearer <jwt>` (no
 *                                                  auth provider is configured here)
 *   400 {"code": "BadJsonBody" | "InvalidFunctionPath" | "BadFormat" | ..., "message"}
 *   404 {"code": "DeploymentNotFound", ...}        unknown (or deleted) deployment
 *   429 {"code": "RateLimited", ...}               while the deployment is throttled
 * `Authorization: Convex <deploy key>` makes the caller admin: it may call internal
 * functions on every endpoint. Without it only public functions answer. Values are
 * Convex's JSON encoding (`convexToJson`/`jsonToConvex`); "json" (the default, as on
 * the real HTTP API) is the clean JSON export (int64 as a string, bytes as base64).
 *
 * Control API, `Authorization: Bearer <admin token>` (never a deploy key):
 *   POST   /_admin/deployments               {"name", "deployKey", "appDir", "latencyMs"?}
 *   GET    /_admin/deployments               (no keys in the answer; with each one's
 *          `deploys` and `requests`, the API requests it received)
 *   GET    /_admin/deployments/<name>
 *   DELETE /_admin/deployments/<name>
 *   POST   /_admin/deployments/<name>/deploy {"appDir"?}  the stand-in for `npx convex
 *          deploy`: load the folder's current schema and functions, KEEPING the data
 *   POST   <base>/_deploy {"appDir"}  the same deploy, authorized by the deployment's deploy
 *          key (`Authorization: Convex <key>`) as `npx convex deploy` is; what
 *          deploy.mjs (beside this file), byod's stand-in deploy command, calls
 *   POST   /_admin/deployments/<name>/import {"table", "documents": [...]}  insert the
 *          documents (Convex's JSON) into the table in one transaction, checked against
 *          the schema (a seed, as `npx convex import --table` does)
 *   POST   /_admin/deployments/<name>/throttle {"requests": N, "retryAfterSeconds"?}
 *          answer the deployment's next N API requests with 429
 *   POST   /_admin/deployments/<name>/latency  {"ms": N}  wait N ms before answering
 *          each API request (outside the serialization below, as network latency is)
 *
 * How a deploy keeps the data. convex-test has no public way to swap an instance's
 * schema or modules, nor to insert documents with given `_id`s. Its source keeps each
 * instance's state in one object (`convexGlobal`: per component, the in-memory database
 * `db` and the module loader `modules`), reachable only through a module-private
 * AsyncLocalStorage. This server imports a copy of convex-test's own module (same
 * version, same code, imports pointed at the same `convex` package) with one line
 * appended that exports that AsyncLocalStorage, and reads the instance's state from
 * inside a `t.run`. A deploy then builds the new code, lets convex-test itself make a
 * database and module loader for it (`registerComponent` on a scratch component, which
 * also validates the schema), checks every existing document against the new schema (a
 * mismatch refuses the deploy, as `npx convex deploy` does, and nothing changes), and
 * swaps the root component's schema and module loader. The documents, their `_id`s and
 * `_creationTime`s, the id counter and pending scheduled functions are never touched.
 *
 * Concurrency. convex-test serializes transactions per instance but not whole requests
 * (an action interleaves with others), and a deploy must not run mid-request, so each
 * deployment runs one request (or deploy) at a time, in arrival order.
 */
import { AsyncLocalStorage } from "node:async_hooks";
import crypto from "node:crypto";
import fsSync from "node:fs";
import fs from "node:fs/promises";
import http from "node:http";
import { builtinModules } from "node:module";
import os from "node:os";
import path from "node:path";
import util from "node:util";
import { fileURLToPath, pathToFileURL } from "node:url";

const realSetTimeout = globalThis.setTimeout;
const MAX_BODY = 32 * 1024 * 1024;
const NAME = /^[a-z0-9][a-z0-9-]{0,62}$/;
const STATUS_UDF_FAILED = 560;
const SOURCE_FILE = /^[A-Za-z0-9_][\w-]*\.(ts|tsx|js|jsx|mjs)$/;

// ---------------------------------------------------------------------------------------
// Command line

function parseOptions(argv) {
  const options = {
    port: 0,
    adminToken: process.env.BYOD_CONVEX_ADMIN_TOKEN ?? "",
    latencyMs: 0,
    workDir: null,
    exitWithStdin: false,
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) fail(`${flag} needs a value`);
      return argv[++i];
    };
    if (flag === "--port") options.port = Number(value());
    else if (flag === "--admin-token") options.adminToken = value();
    else if (flag === "--latency-ms") options.latencyMs = Number(value());
    else if (flag === "--work-dir") options.workDir = path.resolve(value());
    else if (flag === "--exit-with-stdin") options.exitWithStdin = true;
    else fail(`unknown option ${flag}`);
  }
  if (!Number.isInteger(options.port) || options.port < 0 || options.port > 65535) {
    fail("--port must be a port number (0: any free port)");
  }
  if (!Number.isFinite(options.latencyMs) || options.latencyMs < 0) {
    fail("--latency-ms must be a number of milliseconds");
  }
  if (options.adminToken.length < 8) {
    fail(
      "an admin token of 8 characters or more is needed (--admin-token or BYOD_CONVEX_ADMIN_TOKEN)",
    );
  }
  return options;
}

function fail(message) {
  process.stderr.write(`convex-local: ${message}\n`);
  process.exit(2);
}

function log(message) {
  process.stderr.write(`convex-local: ${message}\n`);
}

// ---------------------------------------------------------------------------------------
// Function logs: console output of a function goes to its response's logLines; any other
// console output (convex-test's own) goes to stderr, so stdout stays the port line only.

const logLinesStore = new AsyncLocalStorage();
for (const level of ["log", "info", "warn", "error", "debug"]) {
  console[level] = (...args) => {
    const lines = logLinesStore.getStore();
    const text = util.format(...args);
    if (lines !== undefined) lines.push(`[${level.toUpperCase()}] ${text}`);
    else process.stderr.write(`${text}\n`);
  };
}

// ---------------------------------------------------------------------------------------
// convex-test, opened: the same module with its instance-state storage exported.

async function loadConvexTest(workDir) {
  const url = import.meta.resolve("convex-test");
  let source = await fs.readFile(fileURLToPath(url), "utf8");
  // Its import statements are one line each: point them at the original's targets.
  source = source.replace(/^(import [^\n]* from )"([^"]+)";$/gm, (whole, head, spec) => {
    if (spec.startsWith("node:")) return whole;
    const target = spec.startsWith(".") ? new URL(spec, url).href : import.meta.resolve(spec);
    return `${head}${JSON.stringify(target)};`;
  });
  source += "\nexport { convexGlobalStorage as __byodConvexGlobalStorage };\n";
  const file = path.join(workDir, "convex-test-open.mjs");
  await fs.writeFile(file, source);
  const module = await import(pathToFileURL(file).href);
  if (typeof module.convexTest !== "function" || module.__byodConvexGlobalStorage === undefined) {
    throw new Error("this convex-test version is not the one convex-local knows");
  }
  return module;
}

/** The instance's state object (`convexGlobal` in convex-test's source). */
async function instanceState(convexTestModule, t) {
  let state = null;
  await t.run(async () => {
    state = convexTestModule.__byodConvexGlobalStorage.getStore();
    return null;
  });
  if (state === null || state.components?.[""]?.db === undefined) {
    throw new Error("could not reach convex-test's instance state");
  }
  return state;
}

/** convex-test's ids end with their table's name after a run of digits. */
function tableNameFromId(id) {
  const match = /^[0-9]+/.exec(id);
  return match === null || match[0].length === id.length ? null : id.slice(match[0].length);
}

// ---------------------------------------------------------------------------------------
// Building an app: convex/*.ts -> one ES module per file, imports kept as imports.

class DeployError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

function functionsDir(appDir) {
  let relative = "convex";
  const config = path.join(appDir, "convex.json");
  if (fsSync.existsSync(config)) {
    try {
      const parsed = JSON.parse(fsSync.readFileSync(config, "utf8"));
      if (typeof parsed.functions === "string") relative = parsed.functions;
    } catch (error) {
      throw new DeployError("DeployFailed", `convex.json is not valid JSON: ${error.message}`);
    }
  }
  const dir = path.resolve(appDir, relative);
  if (!fsSync.existsSync(dir) || !fsSync.statSync(dir).isDirectory()) {
    throw new DeployError("DeployFailed", `the app has no functions folder ${relative}/`);
  }
  return dir;
}

async function sourceFiles(dir) {
  const found = [];
  for (const entry of await fs.readdir(dir, { withFileTypes: true })) {
    if (entry.name.startsWith(".") || entry.name === "node_modules") continue;
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) found.push(...(await sourceFiles(full)));
    else if (entry.isFile() && SOURCE_FILE.test(entry.name)) found.push(full);
  }
  return found.sort();
}

const stripExtension = (file) => file.replace(/\.[^./]+$/, "");
const posix = (p) => p.split(path.sep).join("/");

function resolveLocal(fromDir, spec) {
  const base = path.resolve(fromDir, spec);
  const candidates = [base];
  if (/\.(m?js|jsx)$/.test(base)) candidates.push(stripExtension(base));
  const stems = candidates.slice();
  for (const stem of stems) {
    for (const ext of [".ts", ".tsx", ".js", ".jsx", ".mjs"]) candidates.push(stem + ext);
    for (const ext of [".ts", ".js"]) candidates.push(path.join(stem, `index${ext}`));
  }
  return candidates.find((c) => fsSync.existsSync(c) && fsSync.statSync(c).isFile()) ?? null;
}

/** `convex` and `convex/...`: always this server's copy, the one convex-test runs with. */
const SERVER_PACKAGE = /^convex(\/|$)/;
const DEFAULT_RESOLUTION = Symbol("default resolution");

/** Relative imports of other function files stay imports (of their .js output); other
 * relative files are bundled in; `convex` resolves to this server's copy (the same one
 * convex-test runs with); the app's own packages (convex-helpers, ...) are bundled from
 * its node_modules, and a package the app does not have comes from this server's. */
function externalsPlugin(entries) {
  const entryStems = new Set(entries.map(stripExtension));
  return {
    name: "convex-local-externals",
    setup(build) {
      build.onResolve({ filter: /.*/ }, async (args) => {
        if (args.kind === "entry-point" || args.pluginData === DEFAULT_RESOLUTION) {
          return undefined;
        }
        const spec = args.path;
        if (spec.startsWith("node:") || builtinModules.includes(spec)) {
          return { path: spec, external: true };
        }
        if (spec.startsWith(".") || spec.startsWith("/")) {
          const target = resolveLocal(args.resolveDir, spec);
          if (target !== null && entryStems.has(stripExtension(target))) {
            let relative = posix(
              path.relative(path.dirname(args.importer), stripExtension(target)),
            );
            if (!relative.startsWith(".")) relative = `./${relative}`;
            return { path: `${relative}.js`, external: true };
          }
          return undefined;
        }
        if (!SERVER_PACKAGE.test(spec)) {
          const own = await build.resolve(spec, {
            kind: args.kind,
            importer: args.importer,
            resolveDir: args.resolveDir,
            pluginData: DEFAULT_RESOLUTION,
          });
          if (own.errors.length === 0 && own.path) return { path: own.path };
        }
        try {
          return { path: import.meta.resolve(spec), external: true };
        } catch {
          return { errors: [{ text: `cannot resolve the package ${spec}` }] };
        }
      });
    },
  };
}

let buildCounter = 0;

/** Build an app's functions into a fresh folder; its modules, schema and functions. */
async function buildApp(esbuild, workDir, deploymentName, appDir) {
  const convexDir = functionsDir(appDir);
  const entries = await sourceFiles(convexDir);
  if (entries.length === 0) {
    throw new DeployError("DeployFailed", "the app's functions folder has no source files");
  }
  buildCounter += 1;
  const outDir = path.join(workDir, "builds", `${deploymentName}-${buildCounter}`);
  try {
    await esbuild.build({
      entryPoints: entries,
      outdir: outDir,
      outbase: convexDir,
      bundle: true,
      format: "esm",
      platform: "node",
      target: "node20",
      outExtension: { ".js": ".js" },
      logLevel: "silent",
      plugins: [externalsPlugin(entries)],
    });
  } catch (error) {
    await fs.rm(outDir, { recursive: true, force: true });
    const messages = (error.errors ?? []).map((m) => {
      const at = m.location ? `${path.relative(appDir, m.location.file)}:${m.location.line}: ` : "";
      return `${at}${m.text}`;
    });
    throw new DeployError("DeployFailed", `build failed: ${messages.join("; ") || error.message}`);
  }
  await fs.writeFile(path.join(outDir, "package.json"), '{"type": "module"}\n');

  const modules = {};
  const urls = {};
  for (const entry of entries) {
    const relative = `${posix(path.relative(convexDir, stripExtension(entry)))}.js`;
    const url = pathToFileURL(path.join(outDir, relative)).href;
    modules[`./${relative}`] = () => import(url);
    urls[relative.slice(0, -3)] = url;
  }
  if (!Object.keys(modules).some((key) => key.includes("_generated"))) {
    // convex-test finds the functions' root by a _generated/ file.
    const url = import.meta.resolve("convex/server");
    modules["./_generated/server.js"] = () => import(url);
  }

  // Load every module now, as a push analyzes them: an error surfaces at deploy time.
  const functions = new Map();
  let schema = null;
  for (const [modulePath, url] of Object.entries(urls)) {
    let loaded;
    try {
      loaded = await import(url);
    } catch (error) {
      await fs.rm(outDir, { recursive: true, force: true });
      throw new DeployError("DeployFailed", `${modulePath}: ${error?.message ?? error}`);
    }
    if (modulePath === "schema") {
      schema = loaded.default ?? null;
      continue;
    }
    if (modulePath.startsWith("_generated/") || modulePath === "http") continue;
    for (const [exportName, value] of Object.entries(loaded)) {
      if (typeof value !== "function") continue;
      const type = value.isQuery
        ? "query"
        : value.isMutation
          ? "mutation"
          : value.isAction
            ? "action"
            : null;
      if (type === null) continue;
      functions.set(`${modulePath}:${exportName}`, {
        type,
        visibility: value.isInternal ? "internal" : "public",
      });
    }
  }
  return { outDir, modules, schema, functions };
}

// ---------------------------------------------------------------------------------------
// Deployments

function keyDigest(key) {
  return crypto.createHash("sha256").update(key, "utf8").digest();
}

function sameKey(digest, candidate) {
  return crypto.timingSafeEqual(digest, keyDigest(candidate));
}

class Deployment {
  constructor(name, deployKey, appDir, latencyMs) {
    this.name = name;
    this.keyDigest = keyDigest(deployKey);
    this.appDir = appDir;
    this.latencyMs = latencyMs;
    this.throttled = 0;
    this.retryAfterSeconds = null;
    this.deploys = 0;
    this.requests = 0;
    this.deleted = false;
    this.t = null;
    this.state = null;
    this.build = null;
    this.tail = Promise.resolve();
  }

  /** Run `work` after everything queued before it on this deployment. */
  serialized(work) {
    const run = this.tail.then(work, work);
    this.tail = run.then(
      () => undefined,
      () => undefined,
    );
    return run;
  }

  describe(baseUrl) {
    return {
      name: this.name,
      url: `${baseUrl}/d/${this.name}`,
      appDir: this.appDir,
      deploys: this.deploys,
      requests: this.requests,
      latencyMs: this.latencyMs,
      throttled: this.throttled,
      functions: [...(this.build?.functions ?? new Map()).entries()]
        .map(([p, f]) => ({ path: p, type: f.type, visibility: f.visibility }))
        .sort((a, b) => a.path.localeCompare(b.path)),
    };
  }
}

class Host {
  constructor(options, convexTestModule, esbuild, convexServer, convexValues) {
    this.options = options;
    this.convexTestModule = convexTestModule;
    this.esbuild = esbuild;
    this.convexServer = convexServer;
    this.convexValues = convexValues;
    this.deployments = new Map();
    this.reserved = new Set();
    this.baseUrl = "";
  }

  async create(name, deployKey, appDir, latencyMs) {
    const deployment = new Deployment(name, deployKey, appDir, latencyMs);
    const build = await buildApp(this.esbuild, this.options.workDir, name, appDir);
    try {
      deployment.t = this.convexTestModule.convexTest({
        schema: build.schema ?? undefined,
        modules: build.modules,
        transactionLimits: true,
      });
    } catch (error) {
      await fs.rm(build.outDir, { recursive: true, force: true });
      throw new DeployError("SchemaInvalid", `the schema is not valid: ${error.message}`);
    }
    deployment.state = await instanceState(this.convexTestModule, deployment.t);
    deployment.build = build;
    deployment.deploys = 1;
    return deployment;
  }

  /** Load the app folder's current code into a running deployment, keeping its data. */
  async deploy(deployment, appDir) {
    const build = await buildApp(this.esbuild, this.options.workDir, deployment.name, appDir);
    try {
      const manager = deployment.state.transactionManager;
      // A scheduled function may be mid-transaction; the swap happens between two.
      while (manager._waitOnCurrentFunction !== null) {
        await manager._waitOnCurrentFunction;
      }
      // From here to the swap nothing awaits: no transaction can start in between.
      const components = deployment.state.components;
      const scratch = `__convex_local_deploy_${crypto.randomUUID()}`;
      let fresh;
      try {
        deployment.t.registerComponent(scratch, build.schema ?? null, build.modules);
        fresh = components[scratch];
      } catch (error) {
        throw new DeployError("SchemaInvalid", `the schema is not valid: ${error.message}`);
      } finally {
        delete components[scratch];
      }
      const root = components[""];
      const problems = mismatchedDocuments(root.db, fresh.db);
      if (problems.length > 0) {
        throw new DeployError(
          "SchemaValidationFailed",
          `Schema validation failed.\n${problems.slice(0, 5).join("\n")}` +
            (problems.length > 5 ? `\n(and ${problems.length - 5} more)` : ""),
        );
      }
      root.db._schema = fresh.db._schema;
      root.modules = fresh.modules;
    } catch (error) {
      await fs.rm(build.outDir, { recursive: true, force: true });
      throw error;
    }
    const previous = deployment.build;
    deployment.build = build;
    deployment.appDir = appDir;
    deployment.deploys += 1;
    if (previous !== null) await fs.rm(previous.outDir, { recursive: true, force: true });
  }

  async remove(deployment) {
    deployment.deleted = true;
    this.deployments.delete(deployment.name);
    await deployment.serialized(async () => {
      if (deployment.build !== null) {
        await fs.rm(deployment.build.outDir, { recursive: true, force: true });
      }
    });
  }
}

/** Documents (outside system tables) that do not match the new schema. */
function mismatchedDocuments(oldDb, newDb) {
  const schema = newDb._schema;
  if (schema === null || !schema.schemaValidation) return [];
  const problems = [];
  for (const [id, document] of Object.entries(oldDb._documents)) {
    const table = tableNameFromId(id);
    if (table === null || table.startsWith("_") || !schema.tables.has(table)) continue;
    const { _id, _creationTime, ...fields } = document;
    try {
      newDb._validate(table, fields);
    } catch (error) {
      problems.push(
        `Document with ID "${id}" in table "${table}" does not match the schema: ${error.message}`,
      );
    }
  }
  return problems;
}

// ---------------------------------------------------------------------------------------
// HTTP

class HttpError extends Error {
  constructor(status, code, message, headers = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.headers = headers;
  }
}

function send(res, status, body, headers = {}) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY) {
      throw new HttpError(413, "PayloadTooLarge", `the request body is over ${MAX_BODY} bytes`);
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString("utf8");
}

function parseJson(text) {
  if (text.trim() === "") return {};
  try {
    const value = JSON.parse(text);
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      throw new Error("expected a JSON object");
    }
    return value;
  } catch (error) {
    throw new HttpError(400, "BadJsonBody", `Failed to parse the JSON body: ${error.message}`);
  }
}

const sleep = (ms) => new Promise((resolve) => realSetTimeout(resolve, ms));

function requestId() {
  return crypto.randomBytes(8).toString("hex");
}

/** `module:function` (`module` alone: its default export), or null when malformed. */
function canonicalPath(raw) {
  if (typeof raw !== "string") return null;
  const parts = raw.split(":");
  if (parts.length > 2) return null;
  const modulePath = parts[0].replace(/\.js$/, "");
  const functionName = parts[1] ?? "default";
  if (!/^[A-Za-z0-9_][\w/.-]*$/.test(modulePath) || modulePath.includes("..")) return null;
  if (!/^[A-Za-z_$][\w$]*$/.test(functionName)) return null;
  return `${modulePath}:${functionName}`;
}

function toCleanJson(value) {
  if (value === null || typeof value === "boolean" || typeof value === "string") return value;
  if (value === undefined) return null;
  if (typeof value === "number") return Number.isFinite(value) ? value : String(value);
  if (typeof value === "bigint") return value.toString();
  if (value instanceof ArrayBuffer) return Buffer.from(value).toString("base64");
  if (Array.isArray(value)) return value.map(toCleanJson);
  const out = {};
  for (const [key, item] of Object.entries(value)) {
    if (item !== undefined) out[key] = toCleanJson(item);
  }
  return out;
}

function isConvexError(error) {
  return typeof error === "object" && error !== null && Symbol.for("ConvexError") in error;
}

const TYPE_NAMES = { query: "Query", mutation: "Mutation", action: "Action" };

async function callFunction(host, deployment, endpoint, body, admin) {
  const { convexToJson, jsonToConvex } = host.convexValues;
  const udfPath = canonicalPath(body.path);
  if (udfPath === null) {
    throw new HttpError(
      400,
      "InvalidFunctionPath",
      `Invalid function path: ${JSON.stringify(body.path)}`,
    );
  }
  const format = body.format ?? "json";
  if (format !== "json" && format !== "convex_encoded_json") {
    throw new HttpError(400, "BadFormat", `Unsupported value format ${JSON.stringify(format)}`);
  }
  if (endpoint === "function" && ![undefined, null, ""].includes(body.componentPath)) {
    throw new HttpError(400, "BadComponentPath", "This deployment has no components");
  }
  let rawArgs = body.args ?? {};
  if (Array.isArray(rawArgs)) {
    if (rawArgs.length > 1) {
      throw new HttpError(400, "BadJsonBody", "args must be an object or a list of one object");
    }
    rawArgs = rawArgs[0] ?? {};
  }
  let args;
  try {
    args = jsonToConvex(rawArgs);
  } catch (error) {
    throw new HttpError(400, "BadJsonBody", `args are not a Convex value: ${error.message}`);
  }
  if (args === null || typeof args !== "object" || Array.isArray(args)) {
    throw new HttpError(400, "BadJsonBody", "args must be an object");
  }

  const id = requestId();
  const encode = (value) => (format === "json" ? toCleanJson(value) : convexToJson(value));
  const failed = (message, logLines = [], data = undefined) => {
    const answer = {
      status: "error",
      errorMessage: `[Request ID: ${id}] Server Error\n${message}`,
    };
    if (data !== undefined) answer.errorData = encode(data);
    answer.logLines = logLines;
    return { status: STATUS_UDF_FAILED, body: answer };
  };

  const fn = deployment.build.functions.get(udfPath);
  if (fn === undefined || (fn.visibility === "internal" && !admin)) {
    return failed(
      `Could not find public function for '${udfPath.replace(/:default$/, "")}'. ` +
        "Did you forget to run `npx convex dev` or `npx convex deploy`?",
    );
  }
  if (endpoint !== "function" && fn.type !== endpoint) {
    return failed(
      `Trying to execute ${udfPath} as ${TYPE_NAMES[endpoint]}, but it is defined as ` +
        `${TYPE_NAMES[fn.type]}.`,
    );
  }

  const logLines = [];
  try {
    const reference = host.convexServer.makeFunctionReference(udfPath);
    const result = await logLinesStore.run(logLines, () => deployment.t[fn.type](reference, args));
    return {
      status: 200,
      body: { status: "success", value: encode(result === undefined ? null : result), logLines },
    };
  } catch (error) {
    if (isConvexError(error)) {
      return failed(`Uncaught ConvexError: ${error.message}`, logLines, error.data);
    }
    const name = error instanceof Error ? error.name : "Error";
    const message = error instanceof Error ? error.message : String(error);
    return failed(`Uncaught ${name}: ${message}`, logLines);
  }
}

/** Whether the caller is admin (true), anonymous (false), or refused (throws 401). */
function authenticate(deployment, header) {
  if (header === undefined || header === "") return false;
  const [scheme, ...rest] = header.split(" ");
  const token = rest.join(" ");
  if (scheme === "Convex") {
    if (token !== "" && sameKey(deployment.keyDigest, token)) return true;
    throw new HttpError(401, "BadAdminKey", "The provided admin key was invalid for this instance");
  }
  if (scheme === "Bearer") {
    throw new HttpError(
      401,
      "NoAuthProvider",
      "No auth provider found matching the given token (this local deployment has none)",
    );
  }
  throw new HttpError(
    401,
    "InvalidAuthHeader",
    "The Authorization header must be `Convex <deploy key>` or `Bearer <token>`",
  );
}

async function handleDeploymentRequest(host, req, res, name, endpoint) {
  const deployment = host.deployments.get(name);
  if (deployment === undefined) {
    throw new HttpError(404, "DeploymentNotFound", `No deployment named ${JSON.stringify(name)}`);
  }
  if (!["query", "mutation", "action", "function"].includes(endpoint)) {
    throw new HttpError(404, "NotFound", `No route /api/${endpoint}`);
  }
  if (req.method !== "POST") {
    throw new HttpError(405, "MethodNotAllowed", `/api/${endpoint} takes POST`);
  }
  const text = await readBody(req);
  deployment.requests += 1;
  if (deployment.latencyMs > 0) await sleep(deployment.latencyMs);
  if (deployment.throttled > 0) {
    deployment.throttled -= 1;
    const headers =
      deployment.retryAfterSeconds === null
        ? {}
        : { "Retry-After": String(deployment.retryAfterSeconds) };
    throw new HttpError(
      429,
      "RateLimited",
      "Too many requests to this deployment; retry later",
      headers,
    );
  }
  const body = parseJson(text);
  const admin = authenticate(deployment, req.headers.authorization);
  const answer = await deployment.serialized(async () => {
    if (deployment.deleted) {
      throw new HttpError(404, "DeploymentNotFound", `No deployment named ${JSON.stringify(name)}`);
    }
    return await callFunction(host, deployment, endpoint, body, admin);
  });
  send(res, answer.status, answer.body);
}

/** Deploy `appDir` to the deployment between two of its requests. */
async function deploySerialized(host, deployment, appDir) {
  await deployment.serialized(async () => {
    if (deployment.deleted) throw new HttpError(404, "DeploymentNotFound", "deleted meanwhile");
    try {
      await host.deploy(deployment, appDir);
    } catch (error) {
      throw deployFailure(error);
    }
  });
}

/** `POST <base>/_deploy {"appDir"}` with `Authorization: Convex <deploy key>`: what
 * `npx convex deploy` does with a deploy key, here (deploy.mjs (beside this file)). */
async function handleKeyDeploy(host, req, res, name) {
  const deployment = host.deployments.get(name);
  if (deployment === undefined) {
    throw new HttpError(404, "DeploymentNotFound", `No deployment named ${JSON.stringify(name)}`);
  }
  if (req.method !== "POST") throw new HttpError(405, "MethodNotAllowed", "POST");
  const body = parseJson(await readBody(req));
  if (!authenticate(deployment, req.headers.authorization)) {
    throw new HttpError(401, "MissingAccessToken", "Deploying needs the deploy key");
  }
  const appDir = appDirFrom(body.appDir);
  await deploySerialized(host, deployment, appDir);
  log(`deployed ${deployment.name} from ${appDir} with its deploy key (deploy ${deployment.deploys})`);
  return send(res, 200, deployment.describe(host.baseUrl));
}

function requireAdmin(host, req) {
  const header = req.headers.authorization ?? "";
  const token = header.startsWith("Bearer ") ? header.slice("Bearer ".length) : "";
  if (token === "" || !sameKey(host.adminDigest, token)) {
    throw new HttpError(
      401,
      "Unauthorized",
      "The control API needs `Authorization: Bearer <admin token>`",
    );
  }
}

function appDirFrom(value) {
  if (typeof value !== "string" || value === "") {
    throw new HttpError(400, "BadRequest", "appDir must name the app's folder");
  }
  const dir = path.resolve(value);
  if (!fsSync.existsSync(dir) || !fsSync.statSync(dir).isDirectory()) {
    throw new HttpError(400, "BadRequest", `appDir ${dir} is not a folder`);
  }
  return dir;
}

function deployFailure(error) {
  if (error instanceof DeployError) return new HttpError(400, error.code, error.message);
  return error;
}

async function handleAdminRequest(host, req, res, parts) {
  requireAdmin(host, req);
  const body = ["POST", "PUT"].includes(req.method) ? parseJson(await readBody(req)) : {};
  if (parts.length === 1 && parts[0] === "deployments") {
    if (req.method === "GET") {
      const list = [...host.deployments.values()].map((d) => d.describe(host.baseUrl));
      return send(res, 200, { deployments: list });
    }
    if (req.method !== "POST") throw new HttpError(405, "MethodNotAllowed", "GET or POST");
    const { name, deployKey } = body;
    if (typeof name !== "string" || !NAME.test(name)) {
      throw new HttpError(400, "BadRequest", "name must be lower-case letters, digits and dashes");
    }
    if (typeof deployKey !== "string" || deployKey.length < 8) {
      throw new HttpError(400, "BadRequest", "deployKey must be a string of 8 characters or more");
    }
    const latencyMs = body.latencyMs ?? host.options.latencyMs;
    if (!Number.isFinite(latencyMs) || latencyMs < 0) {
      throw new HttpError(400, "BadRequest", "latencyMs must be a number of milliseconds");
    }
    const appDir = appDirFrom(body.appDir);
    if (host.deployments.has(name) || host.reserved.has(name)) {
      throw new HttpError(
        409,
        "DeploymentExists",
        `A deployment named ${JSON.stringify(name)} exists`,
      );
    }
    host.reserved.add(name);
    try {
      const deployment = await host.create(name, deployKey, appDir, latencyMs);
      host.deployments.set(name, deployment);
      log(`created deployment ${name} from ${appDir}`);
      return send(res, 201, deployment.describe(host.baseUrl));
    } catch (error) {
      throw deployFailure(error);
    } finally {
      host.reserved.delete(name);
    }
  }
  if (parts[0] !== "deployments" || parts.length < 2 || parts.length > 3) {
    throw new HttpError(404, "NotFound", "No such control route");
  }
  const deployment = host.deployments.get(parts[1]);
  if (deployment === undefined) {
    throw new HttpError(
      404,
      "DeploymentNotFound",
      `No deployment named ${JSON.stringify(parts[1])}`,
    );
  }
  const action = parts[2];
  if (action === undefined) {
    if (req.method === "GET") return send(res, 200, deployment.describe(host.baseUrl));
    if (req.method !== "DELETE") throw new HttpError(405, "MethodNotAllowed", "GET or DELETE");
    await host.remove(deployment);
    log(`deleted deployment ${deployment.name}`);
    return send(res, 200, { deleted: deployment.name });
  }
  if (req.method !== "POST") throw new HttpError(405, "MethodNotAllowed", "POST");
  if (action === "deploy") {
    const appDir = body.appDir === undefined ? deployment.appDir : appDirFrom(body.appDir);
    await deploySerialized(host, deployment, appDir);
    log(`deployed ${deployment.name} from ${appDir} (deploy ${deployment.deploys})`);
    return send(res, 200, deployment.describe(host.baseUrl));
  }
  if (action === "import") {
    const { table, documents } = body;
    if (typeof table !== "string" || !/^[A-Za-z][A-Za-z0-9_]*$/.test(table)) {
      throw new HttpError(400, "BadRequest", "table must be a table name");
    }
    if (!Array.isArray(documents) || documents.some((d) => d === null || typeof d !== "object")) {
      throw new HttpError(400, "BadRequest", "documents must be a list of objects");
    }
    const { jsonToConvex } = host.convexValues;
    const values = documents.map((d) => jsonToConvex(d));
    await deployment.serialized(async () => {
      try {
        // one transaction, checked against the deployment's schema as the app's own
        // writes are (`npx convex import --table` of a JSON lines file, locally)
        await deployment.t.run(async (ctx) => {
          for (const value of values) await ctx.db.insert(table, value);
        });
      } catch (error) {
        throw new HttpError(400, "ImportFailed", `${table}: ${error?.message ?? error}`);
      }
    });
    log(`imported ${values.length} documents into ${deployment.name}:${table}`);
    return send(res, 200, { table, imported: values.length });
  }
  if (action === "throttle") {
    const n = body.requests;
    if (!Number.isInteger(n) || n < 0) {
      throw new HttpError(400, "BadRequest", "requests must be a count of requests (0: none)");
    }
    const retryAfter = body.retryAfterSeconds ?? null;
    if (retryAfter !== null && (!Number.isInteger(retryAfter) || retryAfter < 0)) {
      throw new HttpError(400, "BadRequest", "retryAfterSeconds must be whole seconds");
    }
    deployment.throttled = n;
    deployment.retryAfterSeconds = retryAfter;
    return send(res, 200, deployment.describe(host.baseUrl));
  }
  if (action === "latency") {
    const ms = body.ms;
    if (!Number.isFinite(ms) || ms < 0) {
      throw new HttpError(400, "BadRequest", "ms must be a number of milliseconds");
    }
    deployment.latencyMs = ms;
    return send(res, 200, deployment.describe(host.baseUrl));
  }
  throw new HttpError(404, "NotFound", "No such control route");
}

async function handle(host, req, res) {
  const url = new URL(req.url ?? "/", "http://127.0.0.1");
  const parts = url.pathname
    .split("/")
    .filter((p) => p !== "")
    .map(decodeURIComponent);
  if (parts[0] === "_admin") return await handleAdminRequest(host, req, res, parts.slice(1));
  if (parts[0] === "d" && parts.length === 4 && parts[2] === "api") {
    return await handleDeploymentRequest(host, req, res, parts[1], parts[3]);
  }
  if (parts[0] === "d" && parts.length === 3 && parts[2] === "_deploy") {
    return await handleKeyDeploy(host, req, res, parts[1]);
  }
  if (parts[0] === "d" && parts.length >= 2 && !host.deployments.has(parts[1])) {
    throw new HttpError(
      404,
      "DeploymentNotFound",
      `No deployment named ${JSON.stringify(parts[1])}`,
    );
  }
  throw new HttpError(404, "NotFound", `No route ${url.pathname}`);
}

// ---------------------------------------------------------------------------------------
// Main

async function main() {
  const options = parseOptions(process.argv.slice(2));
  const ownWorkDir = options.workDir === null;
  options.workDir ??= await fs.mkdtemp(path.join(os.tmpdir(), "convex-local-"));
  await fs.mkdir(options.workDir, { recursive: true });

  let loaded;
  try {
    loaded = await Promise.all([
      loadConvexTest(options.workDir),
      import("esbuild"),
      import("convex/server"),
      import("convex/values"),
    ]);
  } catch (error) {
    if (ownWorkDir) fsSync.rmSync(options.workDir, { recursive: true, force: true });
    throw error;
  }
  const [convexTestModule, esbuild, convexServer, convexValues] = loaded;
  const host = new Host(options, convexTestModule, esbuild, convexServer, convexValues);
  host.adminDigest = keyDigest(options.adminToken);

  const server = http.createServer((req, res) => {
    handle(host, req, res).catch((error) => {
      if (res.headersSent) {
        res.destroy();
        return;
      }
      if (error instanceof HttpError) {
        send(res, error.status, { code: error.code, message: error.message }, error.headers);
        return;
      }
      log(`internal error: ${error?.stack ?? error}`);
      send(res, 500, { code: "InternalServerError", message: String(error?.message ?? error) });
    });
  });
  server.keepAliveTimeout = 30_000;

  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    server.close();
    server.closeAllConnections?.();
    if (ownWorkDir) fsSync.rmSync(options.workDir, { recursive: true, force: true });
    else fsSync.rmSync(path.join(options.workDir, "builds"), { recursive: true, force: true });
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  if (options.exitWithStdin) {
    process.stdin.on("end", stop);
    process.stdin.on("close", stop);
    process.stdin.resume();
  }

  server.listen(options.port, "127.0.0.1", () => {
    const { port } = server.address();
    host.baseUrl = `http://127.0.0.1:${port}`;
    process.stdout.write(`${JSON.stringify({ port })}\n`);
  });
}

main().catch((error) => {
  process.stderr.write(`convex-local: ${error?.stack ?? error}\n`);
  process.exit(1);
});
