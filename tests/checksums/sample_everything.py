'''A sample that uses much of Python's syntax: its checksum is pinned.

    Indented docstring lines, and trailing spaces.   
'''
from __future__ import annotations

import sqlalchemy as sa
from byod import Migration, MigrationContext

SQL = """
UPDATE documents SET title = upper(title)
WHERE id > :low
"""


class Helper:
    """Docstring of a class."""

    factor: int = 2

    def double(self, x: int, *args: int, scale: float = 1.0, **kw: str) -> float:
        return (x * self.factor + sum(args)) * scale if kw or args else x * 2.0


async def later(n: int) -> list[int]:
    return [i async for i in _numbers(n)]


async def _numbers(n: int):  # type: ignore[no-untyped-def]
    for i in range(n):
        yield i


def up(ctx: MigrationContext) -> None:
    """Upgrade."""
    low, *rest = (1, 2, 3)
    table = {"a": 1, **{"b": 2}}
    width = 8
    label = f"{low!r:>{width}} {rest} {table['a']}"
    match low:
        case 1 if label:
            ctx.conn.execute(sa.text(SQL), {"low": low})
        case _:
            pass
    try:
        assert low == 1, "low"
    except (ValueError, KeyError) as exc:
        raise RuntimeError(str(exc)) from exc
    finally:
        del rest
    with ctx.op.batch_alter_table("documents") as batch:
        batch.add_column(sa.Column("flag", sa.Boolean, nullable=True))
    lam = lambda y: y ** 2  # noqa: E731
    while (n := lam(low)) < 0:
        break
    print(b"bytes", 1_000, 0x1F, 1e3, 2j, ..., None, True, n, not low, -low, low @ low if False else 0)


migration = Migration(id="001_everything", version=1, name="Everything", description="", up=up)
