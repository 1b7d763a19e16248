/**
 * arena: players and the matches they played. A second app for byod's tests, with its
 * own tables and its own npm packages: `convex-helpers` (validators, relationships).
 */
import { defineSchema, defineTable } from "convex/server";
import { v } from "convex/values";
import { literals } from "convex-helpers/validators";
import { byodTables } from "./byodTables";

export default defineSchema({
  players: defineTable({
    name: v.string(),
    league: literals("bronze", "silver", "gold"),
    wins: v.optional(v.number()),
  }),
  // who won and lost, by player name
  matches: defineTable({
    winner: v.string(),
    loser: v.string(),
  }).index("by_winner", ["winner"]),
  ...byodTables,
});
