"""Tags: every document's #hashtags become `tags` rows linked by `documentTags`.

The tables come with the app's schema (deployed before this step runs); the data change
is a backfill: `documents:tagPage` runs on 200 documents at a time, each page and byod's
cursor in ONE Convex mutation, so every document is tagged exactly once even if byod
dies halfway. `down` undoes it page by page (idempotent: safe to run again).
"""

from byod import Backfill, Migration, MigrationContext

PAGE = 200


def up(ctx: MigrationContext) -> None:
    ctx.log.info("tagging documents from their #hashtags")


def down(ctx: MigrationContext) -> None:
    cursor = None
    while True:
        page = ctx.convex.mutation("documents:untagPage", {"cursor": cursor, "numItems": PAGE})
        if page["isDone"]:
            break
        cursor = page["continueCursor"]
    while not ctx.convex.mutation("documents:dropTagsPage", {"numItems": PAGE})["isDone"]:
        pass


migration = Migration(
    id="002_add_tags",
    version=2,
    name="Add tags",
    description="Move #hashtags into tags and documentTags, by a backfill.",
    up=up,
    down=down,
    backfills=[Backfill(table="documents", page="documents:tagPage", batch_size=PAGE)],
)
