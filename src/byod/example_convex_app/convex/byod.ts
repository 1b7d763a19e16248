/**
 * byod's functions in a Convex deployment: the stamp, the lock, a phased step's
 * progress, and the batch wrapper that runs one backfill page and moves the cursor in
 * ONE transaction.
 *
 * This is the canonical copy (src/byod/convex_module/byod.ts); an app keeps an identical
 * copy as `convex/byod.ts`, so the functions are `byod:readStamp` and so on, and spreads
 * `byodTables` (tables.ts) into its schema. Every function is internal: only a caller
 * with the deployment's deploy key (`Authorization: Convex <key>`) can run them.
 *
 * What they promise:
 * - Each mutation is one Convex transaction: it is applied entirely or not at all, and
 *   Convex serializes conflicting transactions, so `takeLock` is a real lock and
 *   `runBatch`'s compare-and-set cannot be raced.
 * - `runBatch` calls the app's page mutation with `ctx.runMutation`, which runs it as a
 *   sub-transaction of the same transaction: the page's writes and the cursor's move
 *   commit together, or neither does (a page that throws leaves the cursor before it).
 * - Functions that take an optional `owner` refuse (`BYOD_LOCK_LOST`) unless that owner
 *   holds the unexpired lock, so a runner whose hold lapsed cannot write.
 * - Refusals are `ConvexError`s whose data is `{code, message, ...}`: `BYOD_DRIFT` (the
 *   progress is not where the caller says), `BYOD_LOCK_LOST`, `BYOD_PAGE_FAILED` (the
 *   page threw; its error, and its data if any, are included), `BYOD_BAD_PAGE` (the page
 *   returned something else than `{continueCursor, isDone, rows}`), `BYOD_BAD_ARGUMENT`.
 *
 * `codeRef` says which commit of the app's code the deployment runs: byod writes it into
 * the copy of this file it deploys with that commit's code (the line `const DEPLOYED_CODE`
 * below); the app's own copy says null, so a deploy made outside byod shows as unknown.
 *
 * A page function is an internal mutation of the app that takes `{cursor, numItems}`
 * (`cursor` null: the first page), does its work on one page of a table
 * (`.paginate({cursor, numItems})`), and returns `{continueCursor, isDone, rows}` with
 * `rows` the documents it went through.
 */
import { makeFunctionReference } from "convex/server";
import { ConvexError, v } from "convex/values";
import { internalMutation, internalQuery } from "./_generated/server";

type Progress = {
  migration: string;
  backfill: number;
  cursor: string | null;
  rowsDone: number;
  rowsTotal: number | null;
  checksum?: string;
};

type PageResult = { continueCursor: string; isDone: boolean; rows: number };

const progressValidator = v.object({
  migration: v.string(),
  backfill: v.number(),
  cursor: v.union(v.string(), v.null()),
  rowsDone: v.number(),
  rowsTotal: v.union(v.number(), v.null()),
  checksum: v.optional(v.string()),
});

const stampValidator = v.object({
  id: v.string(),
  version: v.number(),
  checksum: v.string(),
  appliedAt: v.number(),
});

/** The app commit byod deployed with this copy of the module (null: not deployed by byod). */
const DEPLOYED_CODE: string | null = null;

/** A page function's path: `module:function`, never one of byod's own. */
const PAGE_PATH = /^[A-Za-z0-9_][\w/.-]*:[A-Za-z_$][\w$]*$/;

function refuse(code: string, message: string, extra: Record<string, unknown> = {}): never {
  throw new ConvexError({ code, message, ...extra } as any);
}

function publicProgress(row: Progress): Progress {
  const progress: Progress = {
    migration: row.migration,
    backfill: row.backfill,
    cursor: row.cursor,
    rowsDone: row.rowsDone,
    rowsTotal: row.rowsTotal,
  };
  if (row.checksum !== undefined) {
    progress.checksum = row.checksum;
  }
  return progress;
}

async function findProgress(ctx: any, migration: string) {
  return await ctx.db
    .query("byod_schema_progress")
    .withIndex("by_migration", (q: any) => q.eq("migration", migration))
    .unique();
}

async function findStamp(ctx: any, id: string) {
  return await ctx.db
    .query("byod_schema_stamp")
    .withIndex("by_migration", (q: any) => q.eq("id", id))
    .unique();
}

async function currentLock(ctx: any) {
  return await ctx.db.query("byod_lock").first();
}

/** Refuse unless `owner` (when given) holds the lock and its hold has not expired. */
async function requireLock(ctx: any, owner: string | undefined) {
  if (owner === undefined) {
    return;
  }
  const lock = await currentLock(ctx);
  if (lock === null || lock.owner !== owner || lock.expiresAt <= Date.now()) {
    refuse("BYOD_LOCK_LOST", `byod: ${owner} does not hold the deployment's lock`, {
      owner,
      holder: lock === null ? null : lock.owner,
    });
  }
}

function describe(p: { backfill: number; cursor: string | null; rowsDone: number }): string {
  const at = p.cursor === null ? "its start" : `cursor ${JSON.stringify(p.cursor)}`;
  return `backfill ${p.backfill} at ${at} after ${p.rowsDone} rows`;
}

/** Which app code the deployment runs, as byod deployed it (`ref` null: unknown). */
export const codeRef = internalQuery({
  args: {},
  returns: v.object({ ref: v.union(v.string(), v.null()) }),
  handler: async () => ({ ref: DEPLOYED_CODE }),
});

/** Every applied migration, oldest version first. */
export const readStamp = internalQuery({
  args: {},
  returns: v.array(stampValidator),
  handler: async (ctx: any) => {
    const rows = await ctx.db.query("byod_schema_stamp").withIndex("by_version").collect();
    return rows.map((row: any) => ({
      id: row.id,
      version: row.version,
      checksum: row.checksum,
      appliedAt: row.appliedAt,
    }));
  },
});

/** Record an applied migration; false (and nothing written) when it is already there. */
export const recordStep = internalMutation({
  args: {
    id: v.string(),
    version: v.number(),
    checksum: v.string(),
    appliedAt: v.optional(v.number()),
    owner: v.optional(v.string()),
  },
  returns: v.boolean(),
  handler: async (ctx: any, args: any) => {
    await requireLock(ctx, args.owner);
    if ((await findStamp(ctx, args.id)) !== null) {
      return false;
    }
    await ctx.db.insert("byod_schema_stamp", {
      id: args.id,
      version: args.version,
      checksum: args.checksum,
      appliedAt: args.appliedAt ?? Date.now(),
    });
    return true;
  },
});

/** Forget an applied migration (its rollback); false when it was not there. */
export const removeStamp = internalMutation({
  args: { id: v.string(), owner: v.optional(v.string()) },
  returns: v.boolean(),
  handler: async (ctx: any, args: any) => {
    await requireLock(ctx, args.owner);
    const row = await findStamp(ctx, args.id);
    if (row === null) {
      return false;
    }
    await ctx.db.delete(row._id);
    return true;
  },
});

/** Take (or renew) the deployment's lock for `ttlMs`: true when `owner` holds it now.
 * A lock whose hold expired is taken over. */
export const takeLock = internalMutation({
  args: { owner: v.string(), ttlMs: v.number() },
  returns: v.boolean(),
  handler: async (ctx: any, { owner, ttlMs }: { owner: string; ttlMs: number }) => {
    if (owner === "" || !Number.isFinite(ttlMs) || ttlMs <= 0) {
      refuse("BYOD_BAD_ARGUMENT", "byod: takeLock needs an owner and a positive ttlMs");
    }
    const now = Date.now();
    const lock = await currentLock(ctx);
    if (lock === null) {
      await ctx.db.insert("byod_lock", { owner, expiresAt: now + ttlMs });
      return true;
    }
    if (lock.owner !== owner && lock.expiresAt > now) {
      return false;
    }
    await ctx.db.replace(lock._id, { owner, expiresAt: now + ttlMs });
    return true;
  },
});

/** Release the lock; only its owner can (false otherwise, or when nobody holds it). */
export const releaseLock = internalMutation({
  args: { owner: v.string() },
  returns: v.boolean(),
  handler: async (ctx: any, { owner }: { owner: string }) => {
    const lock = await currentLock(ctx);
    if (lock === null || lock.owner !== owner) {
      return false;
    }
    await ctx.db.delete(lock._id);
    return true;
  },
});

/** Who holds the lock and until when (null: nobody ever took it, or it was released). */
export const readLock = internalQuery({
  args: {},
  returns: v.union(v.object({ owner: v.string(), expiresAt: v.number() }), v.null()),
  handler: async (ctx: any) => {
    const lock = await currentLock(ctx);
    return lock === null ? null : { owner: lock.owner, expiresAt: lock.expiresAt };
  },
});

/** Where a phased step in progress stands (null: its progress was not started). */
export const readProgress = internalQuery({
  args: { migration: v.string() },
  returns: v.union(progressValidator, v.null()),
  handler: async (ctx: any, { migration }: { migration: string }) => {
    const row = await findProgress(ctx, migration);
    return row === null ? null : publicProgress(row);
  },
});

/** Every phased step in progress (at most one, unless a migration was replaced). */
export const listProgress = internalQuery({
  args: {},
  returns: v.array(progressValidator),
  handler: async (ctx: any) => {
    const rows = await ctx.db.query("byod_schema_progress").collect();
    return rows.map(publicProgress);
  },
});

/** Start a phased step's progress at its first backfill's start (with the migration
 * file's `checksum`, when given); when it was already started, change nothing and return
 * where it stands. */
export const startProgress = internalMutation({
  args: {
    migration: v.string(),
    rowsTotal: v.union(v.number(), v.null()),
    checksum: v.optional(v.string()),
    owner: v.optional(v.string()),
  },
  returns: progressValidator,
  handler: async (ctx: any, args: any) => {
    await requireLock(ctx, args.owner);
    const found = await findProgress(ctx, args.migration);
    if (found !== null) {
      return publicProgress(found);
    }
    const row: Progress = {
      migration: args.migration,
      backfill: 0,
      cursor: null,
      rowsDone: 0,
      rowsTotal: args.rowsTotal,
    };
    if (args.checksum !== undefined) {
      row.checksum = args.checksum;
    }
    await ctx.db.insert("byod_schema_progress", row);
    return row;
  },
});

/** End a phased step: its progress must be past its last backfill (`backfills`, their
 * count). The progress row is deleted and, when `stamp` is given, the step recorded in
 * the stamp, in the same transaction; when `unstamp` is given (a rollback's reverse
 * pages are done), that migration leaves the stamp in the same transaction instead. */
export const finishProgress = internalMutation({
  args: {
    migration: v.string(),
    backfills: v.number(),
    stamp: v.optional(
      v.object({ version: v.number(), checksum: v.string(), appliedAt: v.optional(v.number()) }),
    ),
    unstamp: v.optional(v.string()),
    owner: v.optional(v.string()),
  },
  returns: v.null(),
  handler: async (ctx: any, args: any) => {
    await requireLock(ctx, args.owner);
    const found = await findProgress(ctx, args.migration);
    if (found === null || found.backfill !== args.backfills) {
      refuse(
        "BYOD_DRIFT",
        `byod: ${args.migration}: its backfills are not done; cannot finish it`,
        { migration: args.migration, progress: found === null ? null : publicProgress(found) },
      );
    }
    await ctx.db.delete(found._id);
    if (args.stamp !== undefined && (await findStamp(ctx, args.migration)) === null) {
      await ctx.db.insert("byod_schema_stamp", {
        id: args.migration,
        version: args.stamp.version,
        checksum: args.stamp.checksum,
        appliedAt: args.stamp.appliedAt ?? Date.now(),
      });
    }
    if (args.unstamp !== undefined) {
      const applied = await findStamp(ctx, args.unstamp);
      if (applied !== null) {
        await ctx.db.delete(applied._id);
      }
    }
    return null;
  },
});

/** One batch of a backfill, in ONE transaction: check the progress is where the caller
 * says (backfill, cursor and rows done: a compare-and-set), run the app's page mutation
 * `page` on the next `numItems` documents, and move the cursor past them (to the next
 * backfill's start when the page was the last). */
export const runBatch = internalMutation({
  args: {
    migration: v.string(),
    backfill: v.number(),
    page: v.string(),
    cursor: v.union(v.string(), v.null()),
    expectedRowsDone: v.number(),
    numItems: v.number(),
    owner: v.optional(v.string()),
  },
  returns: v.object({ rows: v.number(), isDone: v.boolean(), progress: progressValidator }),
  handler: async (ctx: any, args: any) => {
    if (!PAGE_PATH.test(args.page) || args.page.startsWith("byod:")) {
      refuse("BYOD_BAD_ARGUMENT", `byod: ${JSON.stringify(args.page)} is not a page function`);
    }
    if (!Number.isInteger(args.numItems) || args.numItems < 1) {
      refuse("BYOD_BAD_ARGUMENT", "byod: numItems must be a positive integer");
    }
    await requireLock(ctx, args.owner);
    const found = await findProgress(ctx, args.migration);
    if (found === null) {
      refuse("BYOD_DRIFT", `byod: ${args.migration}: its progress was not started`, {
        migration: args.migration,
        progress: null,
      });
    }
    const expected = {
      backfill: args.backfill,
      cursor: args.cursor,
      rowsDone: args.expectedRowsDone,
    };
    if (
      found.backfill !== expected.backfill ||
      found.cursor !== expected.cursor ||
      found.rowsDone !== expected.rowsDone
    ) {
      refuse(
        "BYOD_DRIFT",
        `byod: ${args.migration}: its progress changed under this run: expected ` +
          `${describe(expected)}, found ${describe(found)}`,
        { migration: args.migration, progress: publicProgress(found) },
      );
    }

    let result: PageResult;
    try {
      result = await ctx.runMutation(makeFunctionReference<"mutation">(args.page), {
        cursor: args.cursor,
        numItems: args.numItems,
      });
    } catch (error: any) {
      const isConvexError =
        typeof error === "object" && error !== null && Symbol.for("ConvexError") in error;
      refuse(
        "BYOD_PAGE_FAILED",
        `byod: ${args.migration}: backfill ${args.backfill}: the page ${args.page} after ` +
          `${args.cursor === null ? "the start" : JSON.stringify(args.cursor)} failed ` +
          `(the cursor stays before it): ${error?.message ?? String(error)}`,
        { migration: args.migration, page: args.page, data: isConvexError ? error.data : null },
      );
    }
    if (
      result === null ||
      typeof result !== "object" ||
      typeof result.continueCursor !== "string" ||
      typeof result.isDone !== "boolean" ||
      !Number.isInteger(result.rows) ||
      result.rows < 0
    ) {
      refuse(
        "BYOD_BAD_PAGE",
        `byod: the page ${args.page} must return {continueCursor, isDone, rows}`,
        { page: args.page },
      );
    }

    const moved: Progress = publicProgress({
      ...found,
      backfill: result.isDone ? found.backfill + 1 : found.backfill,
      cursor: result.isDone ? null : result.continueCursor,
      rowsDone: found.rowsDone + result.rows,
    });
    await ctx.db.patch(found._id, {
      backfill: moved.backfill,
      cursor: moved.cursor,
      rowsDone: moved.rowsDone,
    });
    return { rows: result.rows, isDone: result.isDone, progress: moved };
  },
});
