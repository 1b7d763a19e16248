/**
 * convex-notes: a small notes app, the Convex example byod migrates.
 *
 * Documents carry a title and a body; `documents:tagPage` (a byod backfill page) finds
 * the body's #hashtags, keeps one `tags` row per name and one `documentTags` row per
 * document and tag, and counts on each document how many tags it has (`tagCount`) and
 * how many times a backfill went through it (`updates`). byod's own tables are spread in
 * from `byodTables.ts`, an identical copy of byod's canonical `tables.ts`.
 */
import { defineSchema, defineTable } from "convex/server";
import { v } from "convex/values";
import { byodTables } from "./byodTables";

export default defineSchema({
  documents: defineTable({
    title: v.string(),
    body: v.string(),
    tagCount: v.optional(v.number()),
    updates: v.optional(v.number()),
  }),
  tags: defineTable({
    name: v.string(),
  }).index("by_name", ["name"]),
  documentTags: defineTable({
    documentId: v.id("documents"),
    tagId: v.id("tags"),
  })
    .index("by_document", ["documentId", "tagId"])
    .index("by_tag", ["tagId"]),
  ...byodTables,
});
