"""Tags: every document's #hashtags become `tags` rows linked by `documentTags`.

The tables come with the app's schema (deployed before this step runs); the data change
is a backfill: `documents:tagPage` runs on 200 documents at a time, each page and byod's
cursor in ONE Convex mutation, so every document is tagged exactly once even if byod
dies halfway. A rollback runs `documents:untagPage` (the backfill's `down_page`) the same
way, page by page with a cursor, then `down` deletes the tags themselves.
"""

from byod import Backfill, Migration, MigrationContext

PAGE = 200


def up(ctx: MigrationContext) -> None:
    ctx.log.info("tagging documents from their #hashtags")


def down(ctx: MigrationContext) -> None:
    # every document is untagged by now (the undo pages ran first): drop the tags
    while not ctx.convex.mutation("documents:dropTagsPage", {"numItems": PAGE})["isDone"]:
        pass


migration = Migration(
    id="002_add_tags",
    version=2,
    name="Add tags",
    description="Move #hashtags into tags and documentTags, by a backfill.",
    up=up,
    down=down,
    backfills=[
        Backfill(
            table="documents",
            page="documents:tagPage",
            down_page="documents:untagPage",
            batch_size=PAGE,
        )
    ],
)
