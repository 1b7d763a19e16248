"""What every operation on a SQL instance shares: its connection and transactions, the
stamp and dirty-marker tables (read and written only here and in the step's own
transaction), the control-plane check, and how driver errors become byod's.

from __future__ import annotations

:class:`SqlConnection` is the base of :class:`byod.targets.sql.SqlTarget`; it opens
nothing itself (see :func:`byod.targets.sql.open_target`).
"""

import contextlib
import functools
import sqlite3
from collections.abc import Sequence
from typing import Self

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from byod.clock import utcnow
from byod.errors import (
    BusyError,
    ByodError,
    DirtyInstanceError,
    DriftError,
    UnreachableError,
)
from byod.registry import Migration, Step
from byod.targets._connect import describe_error
from byod.targets.base import (
    CONTROL_PLANE_TABLE,
    StampEntry,
    control_plane_refusal,
)
from byod.targets.dialects import STAMP_TABLE, Dialect, table_exists

__all__ = [
    "ALEMBIC_TABLE",
    "CREATE_DIRTY",
    "CREATE_STAMP",
    "DIRTY_TABLE",
    "INSERT_STAMP",
    "SELECT_ALEMBIC",
    "SqlConnection",
    "create_sql",
    "dirty_error",
    "dirty_table",
    "stamp_table",
]

_stamp_metadata = sa.MetaData()
stamp_table = sa.Table(
    STAMP_TABLE,
    _stamp_metadata,
    sa.Column("id", sa.String(255), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False, unique=True),
    sa.Column("checksum", sa.String(64), nullable=False),
    sa.Column("applied_at", sa.DateTime, nullable=False),
)
CREATE_STAMP = sa.schema.CreateTable(stamp_table, if_not_exists=True)
DIRTY_TABLE = "byod_schema_dirty"
dirty_table = sa.Table(
    DIRTY_TABLE,
    _stamp_metadata,
    sa.Column("id", sa.String(255), primary_key=True),
    sa.Column("direction", sa.String(4), nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
)
CREATE_DIRTY = sa.schema.CreateTable(dirty_table, if_not_exists=True)
#: only read here: a database holding this table with the control plane's id is one
_control_plane = sa.Table(
    CONTROL_PLANE_TABLE, _stamp_metadata, sa.Column("id", sa.String(64), nullable=False)
)
SELECT_STAMP = sa.select(stamp_table).order_by(stamp_table.c.version)
#: where DDL commits on its own: the stamp's rows, then the dirty markers (no version)
SELECT_STAMP_AND_DIRTY = sa.union_all(
    sa.select(
        stamp_table.c.id, stamp_table.c.version, stamp_table.c.checksum, stamp_table.c.applied_at
    ),
    sa.select(dirty_table.c.id, sa.null(), sa.null(), sa.null()),
)
#: Alembic's own record of what is applied (read when an instance is adopted)
ALEMBIC_TABLE = "alembic_version"
SELECT_ALEMBIC = sa.text(f"SELECT version_num FROM {ALEMBIC_TABLE}")
#: the stamp's writes, every value bound: compiled once per dialect
INSERT_STAMP = stamp_table.insert()
DELETE_STAMP = stamp_table.delete().where(stamp_table.c.id == sa.bindparam("id"))


def dirty_error(dirty: list[str]) -> DirtyInstanceError:
    """The refusal to touch an instance a failed step left half-done."""
    return DirtyInstanceError(
        f"the instance is dirty: {', '.join(dirty)} failed halfway and left changes "
        "behind; repair it by hand, then run `byod repair USER`"
    )


@functools.cache
def create_sql(ddl: sa.schema.CreateTable, dialect: sa.Dialect) -> str:
    # DDL is never in SQLAlchemy's statement cache: compile it once per dialect
    return str(ddl.compile(dialect=dialect))


class SqlConnection:
    """One open connection to a SQL instance and the state its operations share."""

    def __init__(
        self,
        engine: sa.Engine,
        conn: sa.Connection,
        dialect: Dialect,
        where: str,
        io_timeout: float | None = None,
        kind: str = "sqlite",
    ):
        self.kind = kind
        self._engine = engine
        self._conn = conn
        self._dialect = dialect
        self.where = where
        self._stamp_ready = False
        self._dirty_ready = False
        self._batch_settings_set = False
        self._io_timeout = io_timeout
        #: the transaction :meth:`begin` left open for the first step, and its stamp
        self._held: tuple[sa.RootTransaction, list[StampEntry]] | None = None
        #: the control plane's id, when whether this is it is still to be asked
        self._unchecked_control_plane: str | None = None
        #: a rehearsal's one transaction: every step and batch a savepoint in it
        self._rehearsal: sa.RootTransaction | None = None
        #: stamp rows to take their syntax checksum at the next step (id -> old, new)
        self._stale: dict[str, tuple[str, str]] = {}

    def holds_control_plane(self, control_plane_id: str) -> bool:
        """Whether this database is the byod control plane whose id is given."""
        exists = table_exists(self._dialect, CONTROL_PLANE_TABLE)
        try:
            with self._reading():
                if not self._conn.execute(exists).scalar():
                    return False
                return self._holds_id(control_plane_id)
        except SQLAlchemyError as exc:
            raise self._lost("checking it is not the control plane", exc) from exc

    def _holds_id(self, control_plane_id: str) -> bool:
        query = sa.select(_control_plane.c.id).where(_control_plane.c.id == control_plane_id)
        return self._conn.execute(query).first() is not None

    def defer_control_plane_check(self, control_plane_id: str) -> bool:
        """See :meth:`byod.targets.base.Target.defer_control_plane_check`: asked in
        :meth:`begin`'s round trip where the dialect reads the stamp there."""
        if self._dialect.lock_and_look is None:
            return False
        self._unchecked_control_plane = control_plane_id
        return True

    def _check_control_plane(self) -> None:
        """Ask the deferred question before anything else is done here."""
        control_plane_id, self._unchecked_control_plane = self._unchecked_control_plane, None
        if control_plane_id is not None and self.holds_control_plane(control_plane_id):
            raise control_plane_refusal(self.where)

    def _rehearsing(self) -> bool:
        return self._rehearsal is not None and self._rehearsal.is_active

    def _transaction(self) -> sa.Transaction:
        """A step's or a batch's own transaction; in a rehearsal, a savepoint."""
        return self._conn.begin_nested() if self._rehearsing() else self._conn.begin()

    def _take_held(self) -> tuple[sa.RootTransaction, list[StampEntry]] | None:
        held, self._held = self._held, None
        return held if held is not None and held[0].is_active else None

    def _give_up_held(self) -> None:
        """Roll back the transaction :meth:`begin` left open (it wrote nothing)."""
        held = self._take_held()
        if held is not None:
            self._rollback_quietly(held[0])

    def _reading(self) -> contextlib.AbstractContextManager[None]:
        """Reads: inside the transaction :meth:`begin` holds, else the dialect's way."""
        if (self._held is not None and self._held[0].is_active) or self._rehearsing():
            return contextlib.nullcontext()
        return self._dialect.reading(self._conn)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read_stamp(self) -> list[StampEntry]:
        """What the instance says is applied, oldest first (empty for a fresh instance).

        Raises :class:`DirtyInstanceError` when a step failed halfway on a database
        whose DDL is not transactional and nobody has repaired it since.
        """
        self._check_control_plane()
        try:
            with self._reading():
                dirty = self._select_dirty() if self._dialect.non_transactional_ddl else []
                stamp = self._select_stamp()
        except SQLAlchemyError as exc:
            raise self._lost("reading the stamp", exc) from exc
        if dirty:
            raise dirty_error(dirty)
        return stamp

    def _select_present(self, present: set[str]) -> tuple[list[StampEntry], list[str]]:
        """The stamp and the dirty markers, of the tables ``present``: one round trip."""
        if STAMP_TABLE in present and DIRTY_TABLE in present:
            rows = self._conn.execute(SELECT_STAMP_AND_DIRTY).all()
            stamp = [
                StampEntry(row.id, int(row.version), row.checksum, row.applied_at)
                for row in rows
                if row.version is not None
            ]
            stamp.sort(key=lambda entry: entry.version)
            return stamp, [str(row.id) for row in rows if row.version is None]
        if DIRTY_TABLE in present:
            return [], [str(r) for r in self._conn.execute(sa.select(dirty_table.c.id)).scalars()]
        if STAMP_TABLE in present:
            return self._select_stamp(known_to_exist=True), []
        return [], []

    def _select_dirty(self) -> list[str]:
        exists = self._conn.execute(table_exists(self._dialect, DIRTY_TABLE)).scalar()
        if not exists:
            return []
        return [str(r) for r in self._conn.execute(sa.select(dirty_table.c.id)).scalars()]

    def _raise_if_dirty(self, step: Step, exc: BaseException) -> None:
        if not self._dialect.non_transactional_ddl:
            return
        try:
            with self._reading():
                dirty = step.migration.id in self._select_dirty()
        except SQLAlchemyError:
            dirty = True  # cannot tell: assume the worst
        if dirty:
            cause = exc.message if isinstance(exc, ByodError) else describe_error(exc)
            raise DirtyInstanceError(
                f"{step.migration.id} failed halfway and this database commits DDL on its "
                f"own, so the instance is dirty: {cause}"
            ) from exc

    def close(self) -> None:
        """Close the connection (and the engine, unless it is shared by every instance
        of its kind). A rehearsal's transaction is rolled back: nothing it did stays."""
        if self._rehearsal is not None:
            self._give_up_held()
            self._rollback_quietly(self._rehearsal)
            self._rehearsal = None
        if self._dialect.shared_engine:
            self._give_up_held()
            self._conn.close()
            return
        # an engine for this instance alone: its session ends here, and the server ends
        # with it what it held open (a read's transaction), so no ROLLBACK is sent first
        self._held = None
        self._dialect.release(self._conn)
        with contextlib.suppress(SQLAlchemyError):
            self._conn.invalidate()
        self._conn.close()
        self._engine.dispose()

    @staticmethod
    def _rollback_quietly(transaction: sa.Transaction) -> None:
        if transaction.is_active:
            # if the connection is gone, the server rolls back on its own
            with contextlib.suppress(SQLAlchemyError):
                transaction.rollback()

    def _select_stamp(self, *, known_to_exist: bool = False) -> list[StampEntry]:
        missing_table = self._dialect.missing_table
        if not known_to_exist:
            if missing_table is not None:
                try:
                    found = self._conn.execute(SELECT_STAMP).all()
                except DBAPIError as exc:
                    if missing_table(exc):
                        return []
                    raise
                self._stamp_ready = True
                return [StampEntry(**row._asdict()) for row in found]
            if not self._conn.execute(table_exists(self._dialect, STAMP_TABLE)).scalar():
                return []
            self._stamp_ready = True  # no need to create it before each step
        rows = self._conn.execute(SELECT_STAMP)
        return [StampEntry(**row._asdict()) for row in rows]

    def _write_stamp(self, step: Step) -> None:
        migration = step.migration
        if step.direction == "up":
            # the primary key and the unique version refuse a second row for this step
            self._conn.execute(
                INSERT_STAMP,
                {
                    "id": migration.id,
                    "version": migration.version,
                    "checksum": migration.checksum,
                    "applied_at": utcnow(),
                },
            )
            return
        deleted = self._conn.execute(DELETE_STAMP, {"id": migration.id}).rowcount
        if deleted != 1:
            raise DriftError(f"stamp removal for {migration.id} matched {deleted} rows, not 1")

    def _busy_or_lost(self, exc: SQLAlchemyError) -> ByodError:
        orig = getattr(exc, "orig", None)
        if getattr(orig, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return BusyError(f"instance {self.where} is locked by another writer")
        return self._lost("starting a transaction", exc)

    def _lost(self, doing: str, exc: SQLAlchemyError) -> UnreachableError:
        return UnreachableError(
            f"instance {self.where}: connection lost while {doing}: {describe_error(exc)}"
        )

    def restamp_later(self, migrations: Sequence[Migration]) -> None:
        """At the next step, under its lock and in its transaction: these migrations'
        stamp rows, recorded with their file's bytes' checksum by an older byod, take the
        syntax checksum (a later reformat of the file is then not drift)."""
        self._stale = {m.id: (m.legacy_checksum, m.checksum) for m in migrations}

    def _restamp(self, stamp: list[StampEntry]) -> None:
        stale, self._stale = self._stale, {}
        for entry in stamp:
            old, new = stale.get(entry.id, ("", ""))
            if old and entry.checksum == old:
                self._conn.execute(
                    stamp_table.update()
                    .where(stamp_table.c.id == entry.id, stamp_table.c.checksum == old)
                    .values(checksum=new)
                )
