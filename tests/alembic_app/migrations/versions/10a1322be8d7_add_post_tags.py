"""add post tags

Revision ID: 10a1322be8d7
Revises: 9e68de2a97d5
Create Date: 2026-12-07 01:15:16.399841

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '10a1322be8d7'
down_revision: Union[str, Sequence[str], None] = '9e68de2a97d5'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "tag",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50), nullable=False, unique=True),
    )
    with op.batch_alter_table("post") as batch_op:
        batch_op.add_column(sa.Column("tag_id", sa.Integer, nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("post") as batch_op:
        batch_op.drop_column("tag_id")
    op.drop_table("tag")
