"""Migration folders for tests: a counter bumped by a non-idempotent step, and a step
that breaks when an instance's data says so."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import write_migrations

COUNTER = {
    "001_create.py": """
        import sqlalchemy as sa
        from byod import Migration

        def up(ctx):
            ctx.op.create_table(
                "counter",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("n", sa.Integer, nullable=False),
            )
            ctx.conn.execute(sa.text("INSERT INTO counter (id, n) VALUES (1, 0)"))

        migration = Migration(id="001_create", version=1, name="Create", description="", up=up)
    """,
    "002_bump.py": """
        import os
        import pathlib
        import time

        import sqlalchemy as sa
        from byod import Migration

        def up(ctx):
            ctx.op.create_table("bumped", sa.Column("id", sa.Integer, primary_key=True))
            ctx.conn.execute(sa.text("UPDATE counter SET n = n + 1"))
            hold = os.environ.get("BYOD_TEST_HOLD_DIR")
            if hold:  # a test kills the process while it waits here, inside the transaction
                pathlib.Path(hold, f"entered-{ctx.user_id}").touch()
                time.sleep(float(os.environ.get("BYOD_TEST_HOLD_SECONDS", "120")))
            if sa.inspect(ctx.conn).has_table("hold_me"):
                from tests import gates
                gates.entered.set()
                gates.release.wait(30)

        def down(ctx):
            ctx.op.drop_table("bumped")
            ctx.conn.execute(sa.text("UPDATE counter SET n = n - 1"))

        migration = Migration(id="002_bump", version=2, name="Bump", description="", up=up,
                              down=down)
    """,
    "003_fragile.py": """
        import sqlalchemy as sa
        from byod import Migration

        def up(ctx):
            ctx.op.create_table("t3", sa.Column("id", sa.Integer, primary_key=True))
            ctx.conn.execute(sa.text("UPDATE counter SET n = n + 10"))
            if sa.inspect(ctx.conn).has_table("break_me"):
                raise RuntimeError("data breaks 003: table break_me is present")
            if sa.inspect(ctx.conn).has_table("melt_me"):
                class Meltdown(BaseException):  # not an Exception, as a careless library's
                    pass

                raise Meltdown("003 melted down")

        def down(ctx):
            if sa.inspect(ctx.conn).has_table("break_down"):
                raise RuntimeError("down of 003 refuses: break_down is present")
            ctx.op.drop_table("t3")
            ctx.conn.execute(sa.text("UPDATE counter SET n = n - 10"))

        migration = Migration(id="003_fragile", version=3, name="Fragile", description="",
                              up=up, down=down)
    """,
}


def counter_migrations(folder: Path) -> Path:
    """The counter migration set, written into ``folder``."""
    return write_migrations(folder, COUNTER)


SLOW = {
    "001_slow.py": """
        import sqlalchemy as sa
        from byod import Migration

        def up(ctx):
            ctx.op.create_table("slow", sa.Column("id", sa.Integer, primary_key=True))
            if ctx.conn.dialect.name == "postgresql":
                ctx.conn.execute(sa.text("SELECT pg_sleep(30)"))
            else:
                ctx.conn.execute(sa.text(
                    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                    "SELECT count(*) FROM (SELECT x FROM c LIMIT 2000000000)"
                ))

        migration = Migration(id="001_slow", version=1, name="Slow", description="", up=up)
    """,
}


def slow_migrations(folder: Path) -> Path:
    """One migration that runs for far longer than any test's timeout."""
    return write_migrations(folder, SLOW)
