/**
 * The client against a real `byod serve` of a seeded fleet, with real tokens (HS256, signed
 * here with the server's secret). `tests/test_typescript_client.py` seeds the fleet, starts
 * the server and runs these with:
 *   BYOD_URL          where the server answers
 *   BYOD_JWT_SECRET   the secret it verifies tokens with
 *   BYOD_TEST_FLEET   JSON: the seeded clerk ids and the seeded fleet run's id
 */
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { describe, test } from "node:test";

import {
  ByodError,
  createByodClient,
  runEnded,
  type ByodClient,
  type FleetRunOptions,
  type Run,
} from "../src/index.js";

interface Fleet {
  atHead: string;
  failed: string;
  pending: string;
  operator: string;
  runId: string;
}

function setting(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run these through tests/test_typescript_client.py`);
  }
  return value;
}

const baseUrl = setting("BYOD_URL");
const secret = setting("BYOD_JWT_SECRET");
const fleet = JSON.parse(setting("BYOD_TEST_FLEET")) as Fleet;

const RFC3339_UTC = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/;

function base64url(data: string | Buffer): string {
  return Buffer.from(data).toString("base64url");
}

/** A token the server accepts: `sub` the clerk id, an operator's when `admin`. */
function token(sub: string, admin = false): string {
  const claims: Record<string, unknown> = { sub, exp: Math.floor(Date.now() / 1000) + 600 };
  if (admin) {
    claims.byod_role = "admin";
  }
  const signed = `${base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }))}.${base64url(JSON.stringify(claims))}`;
  return `${signed}.${base64url(createHmac("sha256", secret).update(signed).digest())}`;
}

function as(sub: string, admin = false): ByodClient {
  return createByodClient({ baseUrl, token: async () => token(sub, admin) });
}

/** Awaits `call` and asserts it threw a ByodError with this status and kind. */
async function refused(call: Promise<unknown>, status: number, kind: string): Promise<ByodError> {
  try {
    await call;
  } catch (error) {
    assert.ok(error instanceof ByodError, `not a ByodError: ${String(error)}`);
    assert.equal(error.status, status, error.message);
    assert.equal(error.kind, kind, error.message);
    assert.equal(error.type, `urn:byod:problem:${kind}`);
    assert.ok(error.detail.length > 0);
    return error;
  }
  assert.fail(`expected ${status} ${kind}`);
}

describe("a signed-in user", () => {
  test("sees their own database and only their own history", async () => {
    const me = as(fleet.atHead);
    const instance = await me.myInstance();
    assert.equal(instance.clerk_id, fleet.atHead);
    assert.equal(instance.connection_status, "connected");
    assert.equal(instance.schema_version, instance.head_version);
    assert.equal(instance.pending, 0);
    const history = await me.myHistory();
    assert.deepEqual(
      history.items.map((entry) => [entry.migration_id, entry.direction, entry.status]),
      [
        ["003_fragile", "up", "completed"],
        ["002_bump", "up", "completed"],
        ["001_create", "up", "completed"],
      ],
    );
    for (const entry of history.items) {
      assert.equal(entry.user_id, instance.user_id);
      assert.match(entry.created_at, RFC3339_UTC);
      assert.ok(entry.completed_at !== null && RFC3339_UTC.test(entry.completed_at));
    }
    const page = await me.myHistory({ limit: 1, offset: 1 });
    assert.deepEqual(page.items.map((entry) => entry.migration_id), ["002_bump"]);

    const other = as(fleet.failed);
    const theirs = await other.myHistory();
    const theirInstance = await other.myInstance();
    assert.ok(theirs.items.length > 0);
    assert.ok(theirs.items.every((entry) => entry.user_id === theirInstance.user_id));
    assert.ok(theirs.items.some((entry) => entry.status === "failed" && entry.error?.includes("break_me")));
  });

  test("reads what is pending", async () => {
    const pending = await as(fleet.pending).myPending();
    assert.equal(pending.count, 3);
    assert.deepEqual(
      pending.migrations.map((m) => [m.id, m.version]),
      [
        ["001_create", 1],
        ["002_bump", 2],
        ["003_fragile", 3],
      ],
    );
  });

  test("never reaches the fleet, another user's run, or anything without a valid token", async () => {
    const me = as(fleet.atHead);
    await refused(me.fleetStatus(), 403, "forbidden");
    await refused(me.userHistory(fleet.failed), 403, "forbidden");
    await refused(me.startFleetRun({ concurrency: 1 }), 403, "forbidden");
    await refused(me.myRun(fleet.runId), 404, "not-found"); // a fleet run, not theirs
    await refused(as("nobody-registered").myInstance(), 404, "unknown-user");
    const forged = createByodClient({ baseUrl, token: `${token(fleet.operator, true)}x` });
    await refused(forged.fleetStatus(), 401, "unauthorized");
    await refused(createByodClient({ baseUrl, token: "" }).myInstance(), 401, "unauthorized");
  });

  test("runs their migrations: 409 while the run is under way, then follows it to its end", async () => {
    const me = as(fleet.pending);
    const runId = await me.runMyMigrations();
    const busy = await refused(me.runMyMigrations(), 409, "busy"); // the run is held in 002
    assert.equal(busy.name, "ByodError");
    await refused(as(fleet.atHead).myRun(runId), 404, "not-found"); // not theirs
    const seen: string[] = [];
    const run = await me.followMyRun(runId, {
      intervalMs: 100,
      onProgress: (r) => seen.push(r.state),
    });
    assert.equal(seen.at(0), "running");
    assert.equal(seen.at(-1), "completed");
    assert.equal(run.kind, "migrate");
    assert.deepEqual([run.planned, run.succeeded, run.failed, run.remaining], [1, 1, 0, 0]);
    assert.match(run.started_at, RFC3339_UTC);
    assert.ok(run.ended_at !== null && RFC3339_UTC.test(run.ended_at));
    const instance = await me.myInstance();
    assert.deepEqual([instance.schema_version, instance.pending], [3, 0]);
    assert.equal((await me.myPending()).count, 0);
  });

  test("stops following when its signal aborts", async () => {
    const controller = new AbortController();
    controller.abort(new Error("left the page"));
    await assert.rejects(as(fleet.atHead).followMyRun("any", { signal: controller.signal }), /left the page/);
  });
});

test("a run is over once it has ended, or stopped with nobody still in flight", () => {
  const base: Run = {
    id: "r", kind: "migrate", state: "running", started_by: "ops (token)",
    started_at: "2026-11-29T10:00:00Z", ended_at: null, target_version: null, undoes: null,
    planned: 3, succeeded: 0, failed: 0, busy: 0, up_to_date: 0, not_started: 0,
    not_eligible: 0, done: 0, remaining: 3, halt_reason: null, distributed: true,
    in_flight: 1, rows_done: 0, rows_total: 0,
  };
  assert.equal(runEnded(base), false);
  // a stopped distributed run: interrupted while the user it handed out finishes
  assert.equal(runEnded({ ...base, state: "interrupted" }), false);
  assert.equal(runEnded({ ...base, state: "interrupted", in_flight: 0 }), true); // lost
  assert.equal(runEnded({ ...base, state: "completed", ended_at: "2026-11-29T10:01:00Z" }), true);
});

describe("an operator", () => {
  const ops = as(fleet.operator, true);

  test("reads the fleet and any user's history", async () => {
    const status = await ops.fleetStatus();
    assert.equal(status.head, 3);
    assert.ok(status.users >= 4);
    assert.ok((status.by_connection.connected ?? 0) >= 4);
    assert.equal(status.by_connection["not configured"], 1);
    const failure = status.recent_failures[0];
    assert.ok(failure);
    assert.equal(failure.clerk_id, fleet.failed);
    assert.ok(failure.at !== null && RFC3339_UTC.test(failure.at));
    const history = await ops.userHistory(fleet.failed, { limit: 2 });
    assert.equal(history.items.length, 2);
    assert.equal(history.items[0]?.status, "failed");
    const seeded = await ops.fleetRun(fleet.runId);
    assert.deepEqual([seeded.state, seeded.succeeded, seeded.failed], ["completed", 2, 1]);
    await refused(ops.fleetRun("no-such-run"), 404, "not-found");
  });

  test("starts a fleet run and follows it; a bad option is a typed 422", async () => {
    const runId = await ops.startFleetRun({ concurrency: 2, retries: 0 });
    const run = await ops.followFleetRun(runId, { intervalMs: 100 });
    assert.equal(run.state, "completed");
    assert.equal(run.failed, 1); // the user whose data breaks 003
    assert.equal(run.done, run.planned);
    await refused(ops.startFleetRun({ concurrency: 0 }), 422, "invalid-request");
    // @ts-expect-error: a misspelt safety limit does not type-check (and the server refuses it)
    const misspelt: FleetRunOptions = { max_failure_rate: 0.1 };
    await refused(ops.startFleetRun(misspelt), 422, "invalid-request");
  });
});
