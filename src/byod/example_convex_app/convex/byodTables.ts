/**
 * byod's tables in a Convex deployment: spread them into the app's schema.
 *
 *     import { defineSchema, defineTable } from "convex/server";
 *     import { byodTables } from "./byodTables";
 *     export default defineSchema({ ...appTables, ...byodTables });
 *
 * This is the canonical copy (src/byod/convex_module/tables.ts); an app keeps an
 * identical copy in its `convex/` folder, under any name that is not a function module
 * path the app already uses (the example app calls it `byodTables.ts`). Only byod's
 * functions (`byod.ts`) write these tables:
 *
 * - `byod_schema_stamp`: one row per applied migration (its id, version, checksum, and
 *   when it was applied, in ms since the epoch): the deployment's own record of what is
 *   applied, as the `byod_schema_stamp` table is in a SQL instance.
 * - `byod_lock`: at most one row, the runner holding the deployment (owner, and when
 *   its hold expires, in ms since the epoch).
 * - `byod_schema_progress`: one row per phased step in progress: which backfill it is
 *   at, the page cursor after the last batch (null: the backfill starts from its
 *   beginning), the rows done so far, the rows the step expected (null: unknown) and
 *   the migration file's checksum when its step started.
 */
import { defineTable } from "convex/server";
import { v } from "convex/values";

export const byodTables = {
  byod_schema_stamp: defineTable({
    id: v.string(),
    version: v.number(),
    checksum: v.string(),
    appliedAt: v.number(),
  })
    .index("by_migration", ["id"])
    .index("by_version", ["version"]),
  byod_lock: defineTable({
    owner: v.string(),
    expiresAt: v.number(),
  }),
  byod_schema_progress: defineTable({
    migration: v.string(),
    backfill: v.number(),
    cursor: v.union(v.string(), v.null()),
    rowsDone: v.number(),
    rowsTotal: v.union(v.number(), v.null()),
    checksum: v.optional(v.string()),
  }).index("by_migration", ["migration"]),
};
