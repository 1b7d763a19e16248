/**
 * The notes app's documents: create, update, list and get them, list the tags
 * (`listTags`), `tagPage`, the backfill page byod runs through `byod:runBatch`, and
 * `untagPage` / `dropTagsPage`, which migration 002's `down` runs page by page.
 *
 * `tagPage` promises, for each document of the page it is given: its body's hashtags
 * (`#name`, not inside a word or after another `#`, lower-cased) each have one `tags`
 * row and one `documentTags` row linking them (created when missing, never twice), its
 * `tagCount` is the number of distinct hashtags, and its `updates` grows by one, so a
 * test can prove every document went through the backfill exactly once.
 */
import { ConvexError, v } from "convex/values";
import { internalMutation, mutation, query } from "./_generated/server";

const HASHTAG = /(?<![\w#])#([A-Za-z][\w-]{0,63})/g;

/** The distinct hashtags of a text, lower-cased, in order of first appearance. */
export function hashtags(text: string): string[] {
  const names = new Set<string>();
  for (const match of text.matchAll(HASHTAG)) {
    names.add(match[1].toLowerCase());
  }
  return [...names];
}

export const create = mutation({
  args: { title: v.string(), body: v.string() },
  returns: v.id("documents"),
  handler: async (ctx, { title, body }) => {
    if (title.trim() === "") {
      throw new ConvexError({ code: "EMPTY_TITLE", message: "a document needs a title" });
    }
    return await ctx.db.insert("documents", { title, body });
  },
});

/** Insert many documents at once (an import; the demo and tests seed deployments with
 * it): at most 1000 a call, so one transaction stays within Convex's limits. */
export const createMany = internalMutation({
  args: { documents: v.array(v.object({ title: v.string(), body: v.string() })) },
  returns: v.number(),
  handler: async (ctx, { documents }) => {
    if (documents.length > 1000) {
      throw new ConvexError({ code: "TOO_MANY", message: "at most 1000 documents a call" });
    }
    for (const document of documents) {
      await ctx.db.insert("documents", document);
    }
    return documents.length;
  },
});

export const update = mutation({
  args: { id: v.string(), body: v.string() },
  returns: v.null(),
  handler: async (ctx, { id, body }) => {
    const documentId = ctx.db.normalizeId("documents", id);
    const document = documentId === null ? null : await ctx.db.get(documentId);
    if (document === null) {
      throw new Error(`no document ${id}`);
    }
    await ctx.db.patch(document._id, { body });
    return null;
  },
});

export const list = query({
  args: {},
  handler: async (ctx) => await ctx.db.query("documents").order("asc").collect(),
});

/** One page of documents, without their bodies (a list of large documents, page by page). */
export const listPage = query({
  args: { cursor: v.union(v.string(), v.null()), numItems: v.number() },
  handler: async (ctx, { cursor, numItems }) => {
    const page = await ctx.db.query("documents").order("asc").paginate({ cursor, numItems });
    return {
      page: page.page.map(({ _id, title, tagCount, updates }) => ({ _id, title, tagCount, updates })),
      continueCursor: page.continueCursor,
      isDone: page.isDone,
    };
  },
});

export const get = query({
  args: { id: v.id("documents") },
  handler: async (ctx, { id }) => await ctx.db.get(id),
});

export const tagPage = internalMutation({
  args: { cursor: v.union(v.string(), v.null()), numItems: v.number() },
  returns: v.object({ continueCursor: v.string(), isDone: v.boolean(), rows: v.number() }),
  handler: async (ctx, { cursor, numItems }) => {
    const page = await ctx.db.query("documents").paginate({ cursor, numItems });
    let newTags = 0;
    for (const document of page.page) {
      const names = hashtags(document.body);
      for (const name of names) {
        const tag = await ctx.db
          .query("tags")
          .withIndex("by_name", (q) => q.eq("name", name))
          .unique();
        let tagId = tag?._id;
        if (tagId === undefined) {
          tagId = await ctx.db.insert("tags", { name });
          newTags += 1;
        }
        const link = await ctx.db
          .query("documentTags")
          .withIndex("by_document", (q) => q.eq("documentId", document._id).eq("tagId", tagId))
          .unique();
        if (link === null) {
          await ctx.db.insert("documentTags", { documentId: document._id, tagId });
        }
      }
      await ctx.db.patch(document._id, {
        tagCount: names.length,
        updates: (document.updates ?? 0) + 1,
      });
    }
    console.log(`tagPage: ${page.page.length} documents, ${newTags} new tags`);
    return { continueCursor: page.continueCursor, isDone: page.isDone, rows: page.page.length };
  },
});

/** Every tag, by name, with the documents it is on. */
export const listTags = query({
  args: {},
  handler: async (ctx) => {
    const tags = await ctx.db.query("tags").withIndex("by_name").collect();
    return await Promise.all(
      tags.map(async (tag) => {
        const links = await ctx.db
          .query("documentTags")
          .withIndex("by_tag", (q) => q.eq("tagId", tag._id))
          .collect();
        return { name: tag.name, documentIds: links.map((link) => link.documentId) };
      }),
    );
  },
});

/** Undo `tagPage` on one page of documents: their `documentTags` rows go, `tagCount`
 * is removed (`updates` is kept: it counts passes of the backfill). Idempotent. */
export const untagPage = internalMutation({
  args: { cursor: v.union(v.string(), v.null()), numItems: v.number() },
  returns: v.object({ continueCursor: v.string(), isDone: v.boolean(), rows: v.number() }),
  handler: async (ctx, { cursor, numItems }) => {
    const page = await ctx.db.query("documents").paginate({ cursor, numItems });
    for (const document of page.page) {
      const links = await ctx.db
        .query("documentTags")
        .withIndex("by_document", (q) => q.eq("documentId", document._id))
        .collect();
      for (const link of links) {
        await ctx.db.delete(link._id);
      }
      await ctx.db.patch(document._id, { tagCount: undefined });
    }
    return { continueCursor: page.continueCursor, isDone: page.isDone, rows: page.page.length };
  },
});

/** Delete one page of tags (after `untagPage` went through every document). */
export const dropTagsPage = internalMutation({
  args: { numItems: v.number() },
  returns: v.object({ isDone: v.boolean(), rows: v.number() }),
  handler: async (ctx, { numItems }) => {
    const tags = await ctx.db.query("tags").take(numItems);
    for (const tag of tags) {
      await ctx.db.delete(tag._id);
    }
    return { isDone: tags.length < numItems, rows: tags.length };
  },
});
