"""shape per tenant

Revision ID: 8dca5a03c92c
Revises: 916fb7b6fd0e
Create Date: 2026-12-07 01:16:43.850749

"""
import time
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '8dca5a03c92c'
down_revision: Union[str, Sequence[str], None] = '916fb7b6fd0e'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    n = op.get_bind().execute(sa.text("SELECT n FROM tenant")).scalar_one()
    op.create_table(f"shape_{n}", sa.Column("id", sa.Integer, primary_key=True))
    time.sleep(0.005)  # a little work between two DDL statements
    op.create_index(f"ix_shape_{n}", f"shape_{n}", ["id"])


def downgrade() -> None:
    """Downgrade schema."""
    n = op.get_bind().execute(sa.text("SELECT n FROM tenant")).scalar_one()
    op.drop_index(f"ix_shape_{n}", table_name=f"shape_{n}")
    op.drop_table(f"shape_{n}")
