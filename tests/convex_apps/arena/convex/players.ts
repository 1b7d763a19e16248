/**
 * Players: list them, and `winsPage`, a byod backfill page that counts each player's
 * wins with convex-helpers' `getManyFrom` (the `by_winner` index of `matches`).
 */
import { v } from "convex/values";
import { getManyFrom } from "convex-helpers/server/relationships";
import { internalMutation, query } from "./_generated/server";

export const list = query({
  args: {},
  handler: async (ctx) => await ctx.db.query("players").order("asc").collect(),
});

export const winsPage = internalMutation({
  args: { cursor: v.union(v.string(), v.null()), numItems: v.number() },
  returns: v.object({ continueCursor: v.string(), isDone: v.boolean(), rows: v.number() }),
  handler: async (ctx, { cursor, numItems }) => {
    const page = await ctx.db.query("players").paginate({ cursor, numItems });
    for (const player of page.page) {
      const won = await getManyFrom(ctx.db, "matches", "by_winner", player.name, "winner");
      await ctx.db.patch(player._id, { wins: won.length });
    }
    return { continueCursor: page.continueCursor, isDone: page.isDone, rows: page.page.length };
  },
});
