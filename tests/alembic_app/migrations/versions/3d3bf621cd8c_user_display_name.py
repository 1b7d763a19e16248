"""user display name

Revision ID: 3d3bf621cd8c
Revises: 10a1322be8d7
Create Date: 2026-12-07 01:15:17.185443

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '3d3bf621cd8c'
down_revision: Union[str, Sequence[str], None] = '10a1322be8d7'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("user") as batch_op:
        batch_op.add_column(sa.Column("display_name", sa.String(80), nullable=True))
    user = sa.table("user", sa.column("email"), sa.column("display_name"))
    op.execute(user.update().values(display_name=user.c.email))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("user") as batch_op:
        batch_op.drop_column("display_name")
