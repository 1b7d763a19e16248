"""Tags: a tags table, a document_tags junction, and every #hashtag moved into them."""

import re

import sqlalchemy as sa

from byod import Migration, MigrationContext

HASHTAG = re.compile(r"(?<![\w#])#([A-Za-z][\w-]{0,63})")

documents = sa.table("documents", sa.column("id", sa.Integer), sa.column("body", sa.Text))
tags = sa.table("tags", sa.column("id", sa.Integer), sa.column("name", sa.String))
document_tags = sa.table(
    "document_tags", sa.column("document_id", sa.Integer), sa.column("tag_id", sa.Integer)
)


def up(ctx: MigrationContext) -> None:
    ctx.op.create_table(
        "tags",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
    )
    ctx.op.create_table(
        "document_tags",
        sa.Column("document_id", sa.Integer, sa.ForeignKey("documents.id"), primary_key=True),
        sa.Column("tag_id", sa.Integer, sa.ForeignKey("tags.id"), primary_key=True),
    )
    found: dict[int, set[str]] = {}
    for doc_id, body in ctx.conn.execute(sa.select(documents.c.id, documents.c.body)):
        names = {name.lower() for name in HASHTAG.findall(body or "")}
        if names:
            found[doc_id] = names
    all_names = sorted(set().union(*found.values())) if found else []
    if not all_names:
        return
    ctx.conn.execute(tags.insert(), [{"name": name} for name in all_names])
    ids = {name: tag_id for name, tag_id in ctx.conn.execute(sa.select(tags.c.name, tags.c.id))}
    ctx.conn.execute(
        document_tags.insert(),
        [
            {"document_id": doc_id, "tag_id": ids[name]}
            for doc_id, names in sorted(found.items())
            for name in sorted(names)
        ],
    )
    ctx.log.info("moved %d hashtags of %d documents into tags", len(all_names), len(found))


def down(ctx: MigrationContext) -> None:
    ctx.op.drop_table("document_tags")
    ctx.op.drop_table("tags")


migration = Migration(
    id="002_add_tags",
    version=2,
    name="Add Tags System",
    description="Add tags and document_tags, and move every #hashtag in document bodies into them.",
    up=up,
    down=down,
)
