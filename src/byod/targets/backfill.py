"""A step in progress, as the instance records it: its backfills' cursor.

A phased step (a migration with backfills or a finalize) runs its schema change, then
each backfill in batches, then its finalize; until the finalize writes the stamp, the
instance holds one row in ``byod_schema_progress`` for the step: which backfill it is at,
the last key done and how many rows are done. Each batch moves that row in the batch's own
transaction, so a batch is applied exactly once and a step resumes where it stopped.
Written only here, in the instance transactions the SQL target opens.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from byod.clock import utcnow
from byod.errors import DriftError, MigrationFailedError
from byod.registry import Backfill, Step
from byod.targets.dialects import timed_out

__all__ = [
    "PROGRESS_TABLE",
    "Batch",
    "Progress",
    "finish",
    "ids",
    "read",
    "run_batch",
    "start",
]

PROGRESS_TABLE = "byod_schema_progress"
_metadata = sa.MetaData()
_progress = sa.Table(
    PROGRESS_TABLE,
    _metadata,
    sa.Column("id", sa.String(255), primary_key=True),
    sa.Column("backfill", sa.Integer, nullable=False),
    sa.Column("last_key", sa.Text, nullable=True),
    sa.Column("rows_done", sa.BigInteger, nullable=False),
    #: the backfills' tables' rows when the schema change was done: an estimate
    sa.Column("rows_total", sa.BigInteger, nullable=True),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    #: the migration file's checksum when its schema change ran
    sa.Column("checksum", sa.String(64), nullable=True),
)


@dataclass(frozen=True)
class Progress:
    """Where a step in progress stands: at backfill ``backfill`` (``len(backfills)``:
    every backfill done, the finalize is next), after ``last_key``."""

    backfill: int
    last_key: Any
    rows_done: int
    rows_total: int | None = None
    #: the migration file's checksum when the step's schema change ran
    checksum: str | None = None


@dataclass(frozen=True)
class Batch:
    """One batch done: how many rows, their first and last key, and whether it was the
    backfill's last."""

    rows: int
    first_key: Any
    last_key: Any
    finished: bool
    #: where the step stands after it
    progress: Progress


#: the cursor's move: only from where the run found it
_MOVE = (
    _progress.update()
    .where(
        _progress.c.id == sa.bindparam("step_id", type_=_progress.c.id.type),
        _progress.c.backfill == sa.bindparam("was_backfill", type_=_progress.c.backfill.type),
        _progress.c.rows_done == sa.bindparam("was_rows", type_=_progress.c.rows_done.type),
    )
    .values(
        backfill=sa.bindparam("to_backfill", type_=_progress.c.backfill.type),
        last_key=sa.bindparam("to_key", type_=_progress.c.last_key.type),
        rows_done=sa.bindparam("to_rows", type_=_progress.c.rows_done.type),
        updated_at=sa.bindparam("at_time", type_=_progress.c.updated_at.type),
    )
)


@functools.cache
def _create_sql(dialect: sa.Dialect) -> str:
    return str(sa.schema.CreateTable(_progress, if_not_exists=True).compile(dialect=dialect))


def read(conn: sa.Connection, step: Step, exists: bool) -> Progress | None:
    """The step's progress row (``exists``: whether the table is there), or None."""
    if not exists:
        return None
    row = conn.execute(sa.select(_progress).where(_progress.c.id == step.migration.id)).first()
    if row is None:
        return None
    last_key = None if row.last_key is None else json.loads(row.last_key)
    total = None if row.rows_total is None else int(row.rows_total)
    return Progress(int(row.backfill), last_key, int(row.rows_done), total, row.checksum)


def ids(conn: sa.Connection, exists: bool) -> list[str]:
    """The steps in progress on the instance (``exists``: whether the table is there)."""
    if not exists:
        return []
    return [str(i) for i in conn.scalars(sa.select(_progress.c.id).order_by(_progress.c.id))]


def start(conn: sa.Connection, step: Step) -> int:
    """Record, with the step's schema change, that its backfills start; returns the rows
    they will walk, counted now (an estimate: the user's app may add some meanwhile).

    A key that is NULL or shared by several rows fails the step (``MigrationFailedError``,
    the schema change rolled back): walking by it would skip rows."""
    total = 0
    for work in step.migration.backfills:
        key: sa.ColumnClause[Any] = sa.column(work.key)
        counts = sa.select(
            sa.func.count(), sa.func.count(key), sa.func.count(sa.distinct(key))
        ).select_from(sa.table(work.table))
        found = _backfill_query(conn, work, "cannot count its rows", counts).one()
        rows, keyed, distinct = (int(n) for n in found)
        if keyed < rows or distinct < keyed:
            flaw = (
                f"is NULL in {rows - keyed} rows"
                if keyed < rows
                else f"is not unique ({keyed - distinct} rows repeat another row's key)"
            )
            raise MigrationFailedError(
                f"backfill of {work.table}: its key {work.key} {flaw}; a backfill walks the "
                "table by a unique, NOT NULL key (its primary key, say), or it would skip rows"
            )
        total += rows
    conn.exec_driver_sql(_create_sql(conn.dialect))
    conn.execute(
        _progress.insert().values(
            id=step.migration.id,
            backfill=0,
            last_key=None,
            rows_done=0,
            rows_total=total,
            updated_at=utcnow(),
            checksum=step.migration.checksum or None,
        )
    )
    return total


def finish(conn: sa.Connection, step: Step) -> None:
    """Forget the step's progress, with its finalize and stamp; it must be at the end."""
    found = read(conn, step, exists=True)
    if found is None or found.backfill != len(step.migration.backfills):
        raise DriftError(f"{step.migration.id}: its backfills are not done; cannot finalize")
    conn.execute(_progress.delete().where(_progress.c.id == step.migration.id))


def _backfill_query(
    conn: sa.Connection,
    work: Backfill,
    what: str,
    query: sa.Executable,
) -> sa.CursorResult[Any]:
    """A query on a backfill's table: a table or column that is not there is the
    migration's mistake (``MigrationFailedError``), not a lost connection."""
    try:
        return conn.execute(query)
    except DBAPIError as exc:
        if exc.connection_invalidated or timed_out(exc):
            raise
        raise _not_there(work, what, exc) from exc


def _not_there(work: Backfill, what: str, exc: sa.exc.StatementError) -> MigrationFailedError:
    cause = exc.orig if exc.orig is not None else exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return MigrationFailedError(
        f"backfill of {work.table} (key {work.key}): {what}: {type(cause).__name__}: {text}"
    )


@functools.lru_cache(maxsize=256)
def _page_sql(
    dialect: sa.Dialect, table_name: str, key_name: str, columns: tuple[str, ...], first: bool
) -> sa.engine.Compiled:
    """A backfill's next page, compiled once for the driver: the first page, or the one
    after ``last``, ``n`` rows in key order."""
    table = sa.table(table_name, sa.column(key_name), *map(sa.column, columns))
    key = table.c[key_name]
    query = sa.select(key, *(table.c[c] for c in columns)).order_by(key)
    if not first:
        query = query.where(key > sa.bindparam("last"))
    return query.limit(sa.bindparam("n", type_=sa.Integer)).compile(dialect=dialect)


def _read_page(
    conn: sa.Connection, work: Backfill, at: Progress, size: int
) -> list[tuple[Any, ...]]:
    """The rows of the next batch, as the driver gives them (plain tuples: key first,
    then ``work.columns``), on the transaction's own connection. Read below
    SQLAlchemy's result layer, which costs a batch as much as the read itself."""
    first = at.last_key is None
    compiled = _page_sql(conn.dialect, work.table, work.key, work.columns, first)
    sql = compiled.string
    values = {"n": size} if first else {"n": size, "last": at.last_key}
    named = compiled.construct_params(values) or values
    order = getattr(compiled, "positiontup", None)
    params: Any = tuple(named[name] for name in order) if order else named
    pooled = conn.connection
    cursor = pooled.cursor()
    try:
        cursor.execute(sql, params)
        return list(cursor.fetchall())
    except conn.dialect.loaded_dbapi.Error as exc:
        lost = conn.dialect.is_disconnect(exc, pooled.dbapi_connection, cursor)
        if lost:
            conn.invalidate(exc)
        wrapped = DBAPIError.instance(
            sql, params, exc, conn.dialect.loaded_dbapi.Error, connection_invalidated=lost
        )
        if lost or (isinstance(wrapped, DBAPIError) and timed_out(wrapped)):
            raise wrapped from exc
        raise _not_there(work, "cannot read its next rows", wrapped) from exc
    finally:
        with contextlib.suppress(Exception):
            cursor.close()


def run_batch(
    conn: sa.Connection,
    step: Step,
    at: Progress,
    backfill: Backfill,
    batch_size: int,
    body: Callable[[sa.Connection, Sequence[Any]], None],
) -> Batch:
    """Apply the next batch of the backfill the step is ``at`` and move the cursor past
    it, inside the caller's transaction. The rows are the table's next ``batch_size`` by
    key. The cursor moves only from where ``at`` says it is (a compare-and-set on the
    progress row), so a batch is applied once even if two runners ever raced for it."""
    rows = _read_page(conn, backfill, at, batch_size)
    if rows:
        try:
            body(conn, rows)
        except MigrationFailedError as exc:
            raise MigrationFailedError(
                f"backfill of {backfill.table}: the batch of keys {rows[0][0]!r} to "
                f"{rows[-1][0]!r} failed (the cursor stays before it): {exc.message}"
            ) from exc
    finished = len(rows) < batch_size
    last = rows[-1][0] if rows else at.last_key
    if not finished and last is None:
        raise MigrationFailedError(
            f"backfill of {backfill.table}: its key {backfill.key} is NULL in a row written "
            "since the step started; a backfill needs a unique, NOT NULL key"
        )
    if not finished and not isinstance(last, int | str):
        raise MigrationFailedError(
            f"backfill of {backfill.table}: its key {backfill.key} must be an integer or "
            f"text column (the cursor is kept as JSON), not {type(last).__name__}"
        )
    moved = Progress(
        at.backfill + 1 if finished else at.backfill,
        None if finished else last,
        at.rows_done + len(rows),
        at.rows_total,
        at.checksum,
    )
    values = {
        "step_id": step.migration.id,
        "was_backfill": at.backfill,
        "was_rows": at.rows_done,
        "to_backfill": moved.backfill,
        "to_key": None if moved.last_key is None else json.dumps(moved.last_key),
        "to_rows": moved.rows_done,
        "at_time": utcnow(),
    }
    if conn.execute(_MOVE, values).rowcount != 1:
        raise DriftError(f"{step.migration.id}: its progress changed under this run")
    return Batch(len(rows), rows[0][0] if rows else None, last, finished, moved)
