"""marker

Revision ID: 916fb7b6fd0e
Revises: 
Create Date: 2026-12-07 01:16:43.382002

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '916fb7b6fd0e'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    # each tenant's database holds its own number (seeded by the app): the next
    # revisions give every tenant a differently shaped schema
    op.create_table("tenant", sa.Column("n", sa.Integer, nullable=False))


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("tenant")
