"""SQL instances through SQLAlchemy: SQLite files, PostgreSQL and MySQL/MariaDB databases.

Each dialect brings how to open it (timeouts, SQLite's transactional-DDL recipe) and how
to take the instance-side lock inside the migration's transaction. The stamp table
``byod_schema_stamp`` lives in the instance and is written only here, in the same
transaction as the migration.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from byod.clock import utcnow
from byod.errors import (
    BusyError,
    ByodError,
    DirtyInstanceError,
    DriftError,
    InstanceTimeoutError,
    MigrationFailedError,
    RehearsalError,
    SettingsError,
    UnreachableError,
)
from byod.instance_url import SUPPORTED_KINDS
from byod.registry import Backfill, Migration, Step
from byod.settings import safe_url
from byod.targets import backfill
from byod.targets._connect import connect, describe_error
from byod.targets.base import (
    CONTROL_PLANE_TABLE,
    BatchBody,
    Phase,
    StampEntry,
    StepBody,
    check_position,
    control_plane_refusal,
    started,
)
from byod.targets.dialects import DIALECTS, STAMP_TABLE, Dialect, table_exists, timed_out

__all__ = ["STAMP_TABLE", "SqlTarget", "describe_error", "open_target"]

_stamp_metadata = sa.MetaData()
_stamp = sa.Table(
    STAMP_TABLE,
    _stamp_metadata,
    sa.Column("id", sa.String(255), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False, unique=True),
    sa.Column("checksum", sa.String(64), nullable=False),
    sa.Column("applied_at", sa.DateTime, nullable=False),
)
_CREATE_STAMP = sa.schema.CreateTable(_stamp, if_not_exists=True)
DIRTY_TABLE = "byod_schema_dirty"
_dirty = sa.Table(
    DIRTY_TABLE,
    _stamp_metadata,
    sa.Column("id", sa.String(255), primary_key=True),
    sa.Column("direction", sa.String(4), nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
)
_CREATE_DIRTY = sa.schema.CreateTable(_dirty, if_not_exists=True)
#: only read here: a database holding this table with the control plane's id is one
_control_plane = sa.Table(
    CONTROL_PLANE_TABLE, _stamp_metadata, sa.Column("id", sa.String(64), nullable=False)
)
_SELECT_STAMP = sa.select(_stamp).order_by(_stamp.c.version)
#: Alembic's own record of what is applied (read when an instance is adopted)
ALEMBIC_TABLE = "alembic_version"
_SELECT_ALEMBIC = sa.text(f"SELECT version_num FROM {ALEMBIC_TABLE}")
#: the stamp's writes, every value bound: compiled once per dialect
_INSERT_STAMP = _stamp.insert()
_DELETE_STAMP = _stamp.delete().where(_stamp.c.id == sa.bindparam("id"))


def _timeout(step: Step, exc: DBAPIError) -> InstanceTimeoutError:
    return InstanceTimeoutError(
        f"{step.migration.id} {step.direction} was stopped by the timeout: {describe_error(exc)}"
    )


@functools.cache
def _create_sql(ddl: sa.schema.CreateTable, dialect: sa.Dialect) -> str:
    # DDL is never in SQLAlchemy's statement cache: compile it once per dialect
    return str(ddl.compile(dialect=dialect))


def open_target(
    url: URL, *, timeout: float = 10.0, ssl_ca: str | None = None, address: str | None = None
) -> SqlTarget:
    """Connect to a SQL instance within ``timeout`` seconds.

    ``timeout`` also bounds each read and write on the connection until a step runs
    (a server that accepts the connection and never answers is given up on); a step's
    own bound is its deadline. ``ssl_ca``: the operator's CA file (or ``system``) that
    verifies the instance's certificate where the URL asks for verification.
    ``address``: the IP address of the URL's host that was checked against the instance
    policy; the connection goes there (the name still serves TLS).

    Raises :class:`SettingsError` for a kind of database byod does not support and
    :class:`UnreachableError` when the instance does not answer.
    """
    dialect = DIALECTS.get(url.get_backend_name())
    if dialect is None:
        supported = ", ".join(SUPPORTED_KINDS)
        raise SettingsError(
            f"instances of kind {url.get_backend_name()!r} are not supported (use {supported})"
        )
    engine, conn = connect(url, dialect, timeout, ssl_ca, address)
    return SqlTarget(
        engine, conn, dialect, where=safe_url(url), io_timeout=timeout, kind=url.get_backend_name()
    )


#: How long past a step's deadline the client still waits for the server's own
#: timeout to stop the statement, before it gives up on the connection.
_DEADLINE_GRACE = 5.0


class SqlTarget:
    """An open connection to one SQL instance; see :class:`byod.targets.base.Target`."""

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

    def prepare(self, first: Migration | None = None) -> None:
        """Nothing to do: a SQL instance's schema is what its migrations make it."""

    def finish(self, at: Migration | None, head: bool) -> None:
        """Nothing to do after the last step: a SQL instance has no app code to deploy."""

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

    def begin(self, deadline: float | None = None) -> list[StampEntry]:
        """See :meth:`byod.targets.base.Target.begin`."""
        look = self._dialect.lock_and_look
        if look is None:  # DDL commits on its own: each step locks in its own transaction
            return self.read_stamp()
        self._give_up_held()
        control_plane_id, self._unchecked_control_plane = self._unchecked_control_plane, None
        names = (STAMP_TABLE,) if control_plane_id is None else (STAMP_TABLE, CONTROL_PLANE_TABLE)
        timeout_ms = None if deadline is None else max(1, int((deadline - time.monotonic()) * 1000))
        try:
            transaction = self._conn.begin()
        except SQLAlchemyError as exc:
            raise self._busy_or_lost(exc) from exc
        try:
            present = look(self._conn, timeout_ms, names)
            if CONTROL_PLANE_TABLE in present and self._holds_id(str(control_plane_id)):
                raise control_plane_refusal(self.where)
            stamp = self._select_stamp(known_to_exist=True) if STAMP_TABLE in present else []
        except DBAPIError as exc:
            self._rollback_quietly(transaction)
            if timed_out(exc):
                raise InstanceTimeoutError(
                    f"instance {self.where}: reading the stamp was stopped by the timeout: "
                    f"{describe_error(exc)}"
                ) from exc
            raise self._lost("reading the stamp", exc) from exc
        except BaseException:
            self._rollback_quietly(transaction)
            raise
        self._stamp_ready = STAMP_TABLE in present
        self._held = (transaction, stamp)
        return stamp

    def rehearse(self, deadline: float | None = None) -> list[StampEntry]:
        """See :meth:`byod.targets.base.Target.rehearse`."""
        if self._dialect.lock_and_look is None:
            raise RehearsalError(
                f"{self.kind} instances cannot be rehearsed: their DDL commits on its own, "
                "so it cannot be rolled back"
            )
        stamp = self.begin(deadline)
        held = self._take_held()
        assert held is not None
        self._rehearsal = held[0]
        return stamp

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

    def __enter__(self) -> SqlTarget:
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
            raise DirtyInstanceError(
                f"the instance is dirty: {', '.join(dirty)} failed halfway and left changes "
                "behind; repair it by hand, then run `byod repair USER`"
            )
        return stamp

    def apply(
        self,
        step: Step,
        body: StepBody,
        deadline: float | None = None,
        phase: Phase = "whole",
    ) -> bool:
        """See :meth:`byod.targets.base.Target.apply`."""
        self._check_control_plane()
        timeout_ms = self._timeout_ms(step, deadline)
        with self._bounded(timeout_ms):
            return self._apply(step, body, deadline, timeout_ms, phase)

    def read_progress(self, step: Step) -> backfill.Progress | None:
        """See :meth:`byod.targets.base.Target.read_progress`."""
        self._check_control_plane()
        try:
            with self._reading():
                exists = self._conn.execute(table_exists(self._dialect, backfill.PROGRESS_TABLE))
                return backfill.read(self._conn, step, bool(exists.scalar()))
        except SQLAlchemyError as exc:
            raise self._lost("reading the step's progress", exc) from exc

    def apply_batch(
        self,
        step: Step,
        at: backfill.Progress,
        work: Backfill,
        batch_size: int,
        body: BatchBody,
        deadline: float | None = None,
    ) -> backfill.Batch:
        """See :meth:`byod.targets.base.Target.apply_batch`."""
        self._check_control_plane()
        self._give_up_held()
        timeout_ms = self._timeout_ms(step, deadline)
        with self._bounded(timeout_ms):
            try:
                transaction = self._transaction()
            except SQLAlchemyError as exc:
                raise self._busy_or_lost(exc) from exc
            try:
                self._batch_lock(timeout_ms)
                done = backfill.run_batch(
                    self._conn,
                    step,
                    at,
                    work,
                    batch_size,
                    lambda conn, rows: self._run_body(step, lambda c: body(c, rows)),
                )
            except DBAPIError as exc:
                self._rollback_batch(transaction)
                if timed_out(exc):
                    raise _timeout(step, exc) from exc
                raise self._busy_or_lost(exc) from exc
            except BaseException:
                self._rollback_batch(transaction)
                raise
            try:
                transaction.commit()
            except SQLAlchemyError as exc:
                raise self._lost(f"committing a batch of {step.migration.id}", exc) from exc
            return done

    def _batch_lock(self, timeout_ms: int | None) -> None:
        settings = self._dialect.batch_settings
        if settings is None:
            self._dialect.lock(self._conn, timeout_ms, False)
        elif not self._batch_settings_set:
            settings(self._conn, timeout_ms)
            self._batch_settings_set = True

    def _rollback_batch(self, transaction: sa.Transaction) -> None:
        self._rollback_quietly(transaction)
        self._batch_settings_set = False  # a rollback takes them back

    def _timeout_ms(self, step: Step, deadline: float | None) -> int | None:
        if deadline is None:
            return None
        timeout_ms = int((deadline - time.monotonic()) * 1000)
        if timeout_ms <= 0:
            raise InstanceTimeoutError(f"the timeout ran out before {step.migration.id}")
        return timeout_ms

    @contextlib.contextmanager
    def _bounded(self, timeout_ms: int | None) -> Iterator[None]:
        # the transaction's own bound: its deadline (and a grace for the server's timeout to
        # speak first), or none at all; a long migration is never cut by the connect timeout
        step_io = None if timeout_ms is None else timeout_ms / 1000 + _DEADLINE_GRACE
        self._dialect.io_timeout(self._conn, step_io)
        try:
            yield
        finally:
            self._dialect.io_timeout(self._conn, self._io_timeout)
            # after the commit or rollback: a session lock (MySQL) outlives transactions
            self._dialect.lock_cleanup(self._conn)

    def _apply(
        self,
        step: Step,
        body: StepBody,
        deadline: float | None,
        timeout_ms: int | None,
        phase: Phase,
    ) -> bool:
        guarded = self._dialect.non_transactional_ddl
        held = self._take_held()
        held_stamp = None
        transaction: sa.Transaction
        if held is not None:  # begin's: locked, the stamp read in it
            transaction, held_stamp = held
        else:
            try:
                transaction = self._transaction()
            except SQLAlchemyError as exc:
                raise self._busy_or_lost(exc) from exc
        try:
            stamp = self._locked_stamp(held_stamp, timeout_ms)
            self._restamp(stamp)
            if not check_position(step, stamp) or (
                phase == "schema" and started(step, self._progress_ids())
            ):
                transaction.rollback()
                return False
            if guarded:  # committed by the body's first DDL, if it has any
                self._conn.exec_driver_sql(_create_sql(_CREATE_DIRTY, self._engine.dialect))
                self._conn.execute(
                    _dirty.insert().values(
                        id=step.migration.id, direction=step.direction, started_at=utcnow()
                    )
                )
            self._run_body(step, body)
            if deadline is not None and time.monotonic() > deadline:
                raise InstanceTimeoutError(f"{step.migration.id} ran past the timeout")
            if phase == "schema":
                backfill.start(self._conn, step)  # the stamp waits for the finalize
            else:
                if phase == "finalize":
                    backfill.finish(self._conn, step)
                self._write_stamp(step)
            if guarded:
                self._conn.execute(_dirty.delete().where(_dirty.c.id == step.migration.id))
        except DBAPIError as exc:
            self._rollback_quietly(transaction)
            self._raise_if_dirty(step, exc)
            if timed_out(exc):
                raise _timeout(step, exc) from exc
            raise self._busy_or_lost(exc) from exc
        except BaseException as exc:
            self._rollback_quietly(transaction)
            if guarded and isinstance(exc, ByodError):
                self._raise_if_dirty(step, exc)
            raise
        try:
            transaction.commit()
        except SQLAlchemyError as exc:
            raise self._lost(f"committing {step.migration.id} (outcome unknown)", exc) from exc
        self._stamp_ready = True
        return True

    def _locked_stamp(
        self, held: list[StampEntry] | None, timeout_ms: int | None
    ) -> list[StampEntry]:
        """In the step's transaction: the lock (or, in :meth:`begin`'s, its new bound), the
        stamp table where it is missing, and the stamp (``held``: already read under it)."""
        if held is None and not self._rehearsing():
            self._dialect.lock(self._conn, timeout_ms, True)
        else:  # locked already, by begin() or the rehearsal
            self._dialect.rebound(self._conn, timeout_ms)
        if not self._stamp_ready:
            self._conn.exec_driver_sql(_create_sql(_CREATE_STAMP, self._engine.dialect))
        return self._select_stamp(known_to_exist=True) if held is None else held

    def _progress_ids(self) -> list[str]:
        exists = self._conn.execute(table_exists(self._dialect, backfill.PROGRESS_TABLE))
        return backfill.ids(self._conn, bool(exists.scalar()))

    def in_progress(self) -> list[str]:
        """See :meth:`byod.targets.base.Target.in_progress`."""
        self._check_control_plane()
        try:
            with self._reading():
                return self._progress_ids()
        except SQLAlchemyError as exc:
            raise self._lost("reading the steps in progress", exc) from exc

    def _run_body(self, step: Step, body: Callable[[sa.Connection], None]) -> None:
        """The migration's own code, its errors told apart: a lost connection, the
        server's timeout, or the migration's failure."""
        try:
            body(self._conn)
        except ByodError:
            raise
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise self._lost(f"running {step.migration.id}", exc) from exc
            if timed_out(exc):
                raise _timeout(step, exc) from exc
            raise MigrationFailedError(describe_error(exc)) from exc
        except Exception as exc:
            raise MigrationFailedError(describe_error(exc)) from exc

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
                    _stamp.update()
                    .where(_stamp.c.id == entry.id, _stamp.c.checksum == old)
                    .values(checksum=new)
                )

    def alembic_revisions(self) -> list[str] | None:
        """The revisions the instance's ``alembic_version`` table holds (None when it has
        no such table): what Alembic says is applied, for adopting the instance."""
        self._check_control_plane()
        try:
            with self._reading():
                return self._alembic_revisions()
        except SQLAlchemyError as exc:
            raise self._lost("reading alembic_version", exc) from exc

    def _alembic_revisions(self) -> list[str] | None:
        if not self._conn.execute(table_exists(self._dialect, ALEMBIC_TABLE)).scalar():
            return None
        return [str(r) for r in self._conn.execute(_SELECT_ALEMBIC).scalars()]

    def adopt(self, migrations: Sequence[Migration], revisions: list[str]) -> bool:
        """Write the stamp of ``migrations`` (1…V, as Alembic applied them) in one
        transaction under the instance's lock, and nothing else; only while
        ``alembic_version`` still holds exactly ``revisions``. False when the stamp says
        exactly that already; :class:`DriftError` when it says anything else."""
        self._check_control_plane()
        wanted = [(m.id, m.version) for m in migrations]
        try:
            with self._conn.begin():
                self._dialect.lock(self._conn, None, True)
                self._conn.exec_driver_sql(_create_sql(_CREATE_STAMP, self._engine.dialect))
                stamp = [(e.id, e.version) for e in self._select_stamp(known_to_exist=True)]
                if stamp == wanted:
                    return False
                if stamp:
                    raise DriftError(
                        f"instance {self.where} has byod's stamp at {stamp[-1][0]} (version "
                        f"{stamp[-1][1]}) already, not {wanted[-1][0] if wanted else 'none'}: "
                        "not adopted"
                    )
                if self._alembic_revisions() != revisions:
                    raise DriftError(
                        f"instance {self.where}: alembic_version changed while it was adopted"
                    )
                now = utcnow()
                rows = [
                    {"id": m.id, "version": m.version, "checksum": m.checksum, "applied_at": now}
                    for m in migrations
                ]
                if rows:
                    self._conn.execute(_INSERT_STAMP, rows)
        except DBAPIError as exc:
            raise self._busy_or_lost(exc) from exc
        finally:
            self._dialect.lock_cleanup(self._conn)
        self._stamp_ready = True
        return True

    def accept_checksum(self, migration: Migration) -> str | None:
        """Under the instance's lock, in one transaction: ``migration``'s stamp row takes
        its checksum now (an operator accepted the file's change); returns the checksum it
        had, or None when it is not applied here or has that one already."""
        self._check_control_plane()
        try:
            with self._conn.begin():
                self._dialect.lock(self._conn, None, True)
                stamp = {e.id: e.checksum for e in self._select_stamp()}
                old = stamp.get(migration.id)
                if old is None or old == migration.checksum:
                    return None
                self._conn.execute(
                    _stamp.update()
                    .where(_stamp.c.id == migration.id)
                    .values(checksum=migration.checksum)
                )
                return old
        except DBAPIError as exc:
            raise self._busy_or_lost(exc) from exc
        finally:
            self._dialect.lock_cleanup(self._conn)

    def clear_dirty(self) -> list[str]:
        """Forget the dirty markers (after an operator repaired the instance by hand)."""
        if not self._dialect.non_transactional_ddl:
            return []
        self._check_control_plane()
        with self._conn.begin():
            markers = self._select_dirty()
            self._conn.execute(_dirty.delete())
        return markers

    def _select_dirty(self) -> list[str]:
        exists = self._conn.execute(table_exists(self._dialect, DIRTY_TABLE)).scalar()
        if not exists:
            return []
        return [str(r) for r in self._conn.execute(sa.select(_dirty.c.id)).scalars()]

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
        self._give_up_held()
        if self._rehearsal is not None:
            self._rollback_quietly(self._rehearsal)
            self._rehearsal = None
        self._conn.close()
        if not self._dialect.shared_engine:
            self._engine.dispose()

    # -- helpers -------------------------------------------------------------------------

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
                    found = self._conn.execute(_SELECT_STAMP).all()
                except DBAPIError as exc:
                    if missing_table(exc):
                        return []
                    raise
                self._stamp_ready = True
                return [StampEntry(**row._asdict()) for row in found]
            if not self._conn.execute(table_exists(self._dialect, STAMP_TABLE)).scalar():
                return []
            self._stamp_ready = True  # no need to create it before each step
        rows = self._conn.execute(_SELECT_STAMP)
        return [StampEntry(**row._asdict()) for row in rows]

    def _write_stamp(self, step: Step) -> None:
        migration = step.migration
        if step.direction == "up":
            # the primary key and the unique version refuse a second row for this step
            self._conn.execute(
                _INSERT_STAMP,
                {
                    "id": migration.id,
                    "version": migration.version,
                    "checksum": migration.checksum,
                    "applied_at": utcnow(),
                },
            )
            return
        deleted = self._conn.execute(_DELETE_STAMP, {"id": migration.id}).rowcount
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
