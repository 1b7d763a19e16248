/**
 * `functions:ping`: the app's health check, as the original plan's migration 001 calls
 * it: which app the deployment runs, and whether it holds any document yet.
 */
import { query } from "./_generated/server";

export const ping = query({
  args: {},
  handler: async (ctx) => ({
    app: "convex-notes",
    hasDocuments: (await ctx.db.query("documents").first()) !== null,
  }),
});
