"""post tag data

Revision ID: 47a113008ee7
Revises: 3d3bf621cd8c
Create Date: 2026-12-07 01:15:18.044367

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '47a113008ee7'
down_revision: Union[str, Sequence[str], None] = '3d3bf621cd8c'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    bind = op.get_bind()
    bind.execute(sa.text("INSERT INTO tag (name) VALUES ('general')"))
    general = bind.execute(sa.text("SELECT id FROM tag WHERE name = 'general'")).scalar_one()
    bind.execute(sa.text("UPDATE post SET tag_id = :t WHERE tag_id IS NULL"), {"t": general})


def downgrade() -> None:
    """Downgrade schema."""
    op.execute("UPDATE post SET tag_id = NULL")
    op.execute("DELETE FROM tag WHERE name = 'general'")
