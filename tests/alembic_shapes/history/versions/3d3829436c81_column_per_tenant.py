"""column per tenant

Revision ID: 3d3829436c81
Revises: 8dca5a03c92c
Create Date: 2026-12-07 01:16:44.353970

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '3d3829436c81'
down_revision: Union[str, Sequence[str], None] = '8dca5a03c92c'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    n = op.get_bind().execute(sa.text("SELECT n FROM tenant")).scalar_one()
    with op.batch_alter_table("tenant") as batch_op:
        batch_op.add_column(sa.Column(f"c_{n}", sa.Integer, nullable=True))
    op.execute(sa.text(f"UPDATE tenant SET c_{n} = n"))


def downgrade() -> None:
    """Downgrade schema."""
    n = op.get_bind().execute(sa.text("SELECT n FROM tenant")).scalar_one()
    with op.batch_alter_table("tenant") as batch_op:
        batch_op.drop_column(f"c_{n}")
