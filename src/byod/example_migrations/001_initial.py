"""Initial schema of the notes app: documents."""

import sqlalchemy as sa

from byod import Migration, MigrationContext


def up(ctx: MigrationContext) -> None:
    ctx.op.create_table(
        "documents",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("body", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
    )
    ctx.op.create_index("ix_documents_updated_at", "documents", ["updated_at"])


migration = Migration(
    id="001_initial",
    version=1,
    name="Initial Schema",
    description="Create the documents table of the notes app.",
    up=up,
    down=None,  # the initial schema holds the user's content: never dropped by a rollback
)
