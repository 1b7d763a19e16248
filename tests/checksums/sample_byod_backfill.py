"""Word counts: a ``words`` column on documents, filled for every document in batches.

The schema change adds the column (nullable); a backfill counts each document's words,
1,000 documents per short transaction, so a user's large instance is never locked for
long and a stopped run resumes where it was; the finalize counts any document the app
wrote meanwhile and makes the column NOT NULL.
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from byod import Backfill, Migration, MigrationContext

documents = sa.table(
    "documents",
    sa.column("id", sa.Integer),
    sa.column("body", sa.Text),
    sa.column("words", sa.Integer),
)
_set_words = (
    documents.update()
    .where(documents.c.id == sa.bindparam("doc_id"))
    .values(words=sa.bindparam("n"))
)


def _count(conn: sa.Connection, rows: Sequence[Any]) -> None:
    conn.execute(
        _set_words, [{"doc_id": key, "n": len((body or "").split())} for key, body in rows]
    )


def up(ctx: MigrationContext) -> None:
    ctx.op.add_column("documents", sa.Column("words", sa.Integer, nullable=True))


def count_words(ctx: MigrationContext, rows: Sequence[Any]) -> None:
    """One batch: ``(id, body)`` of up to 1,000 documents, in id order."""
    _count(ctx.conn, rows)


def finalize(ctx: MigrationContext) -> None:
    missed = ctx.conn.execute(
        sa.select(documents.c.id, documents.c.body).where(documents.c.words.is_(None))
    ).all()
    if missed:  # written by the app after the backfill passed them
        _count(ctx.conn, missed)
    with ctx.op.batch_alter_table("documents") as batch:
        batch.alter_column("words", existing_type=sa.Integer, nullable=False)


def down(ctx: MigrationContext) -> None:
    with ctx.op.batch_alter_table("documents") as batch:
        batch.drop_column("words")


migration = Migration(
    id="003_word_counts",
    version=3,
    name="Word counts",
    description="Add documents.words and count every document's words, in batches.",
    up=up,
    down=down,
    backfills=[
        Backfill(table="documents", key="id", columns=("body",), apply=count_words),
    ],
    finalize=finalize,
)
