"""create user and post

Revision ID: 9e68de2a97d5
Revises: 
Create Date: 2026-12-07 01:15:15.709774

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '9e68de2a97d5'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "user",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(120), nullable=False, unique=True),
    )
    op.create_table(
        "post",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("user.id"), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("body", sa.Text, nullable=True),
    )
    op.create_index("ix_post_user_id", "post", ["user_id"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_post_user_id", table_name="post")
    op.drop_table("post")
    op.drop_table("user")
