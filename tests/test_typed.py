"""byod's types reach the migrations a team writes: ``mypy --strict`` over a migrations
folder written as a user would, run from outside byod's source tree against the installed
package (``py.typed`` ships with it), passes, and a migration that misuses the API is
caught."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

MIGRATION = """
import sqlalchemy as sa

from byod import Backfill, Migration, MigrationContext


def up(ctx: MigrationContext) -> None:
    ctx.op.create_table("notes", sa.Column("id", sa.Integer, primary_key=True))
    ctx.log.info("user %s", ctx.clerk_id)


def down(ctx: MigrationContext) -> None:
    ctx.op.drop_table("notes")


migration = Migration(
    id="001_create_notes",
    version=1,
    name="Notes",
    description="A table of notes.",
    up=up,
    down=down,
)
"""

MISUSE = """
from byod import Migration, MigrationContext


def up(ctx: MigrationContext) -> None:
    total: int = ctx.clerk_id


migration = Migration(id="002_wrong", version="2", name="x", description="", up=up)
"""


def mypy(folder: Path, *files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(folder / ".cache"), *files],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_teams_migrations_type_check_strictly_against_byod(tmp_path: Path) -> None:
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "001_create_notes.py").write_text(textwrap.dedent(MIGRATION))
    (tmp_path / "wrong.py").write_text(textwrap.dedent(MISUSE))
    good = mypy(tmp_path, "migrations/001_create_notes.py")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = mypy(tmp_path, "wrong.py")
    assert bad.returncode == 1, bad.stdout
    assert 'incompatible type "str"; expected "int"' in bad.stdout  # Migration's version
    assert 'expression has type "str", variable has type "int"' in bad.stdout  # ctx.clerk_id
    assert "py.typed" not in bad.stdout  # the package's types were read, not skipped
