"""SQL instances through SQLAlchemy: SQLite files and PostgreSQL databases.

Each dialect brings how to open it (timeouts, SQLite's transactional-DDL recipe) and how
to take the instance-side lock inside the migration's transaction. The stamp table
``byod_schema_stamp`` lives in the instance and is written only here, in the same
transaction as the migration.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from byod.controlplane.schema import utcnow
from byod.errors import (
    BusyError,
    ByodError,
    DriftError,
    InstanceTimeoutError,
    MigrationFailedError,
    SettingsError,
    UnreachableError,
)
from byod.registry import Step
from byod.settings import safe_url
from byod.targets.base import StampEntry, StepBody

__all__ = ["STAMP_TABLE", "SqlTarget", "describe_error", "open_target"]

STAMP_TABLE = "byod_schema_stamp"
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
_SELECT_STAMP = sa.select(_stamp).order_by(_stamp.c.version)
#: Advisory-lock key for PostgreSQL: one lock per database, shared by every byod runner.
_PG_LOCK_KEY = 0x62796F64


def describe_error(exc: BaseException) -> str:
    """``ErrorClass: message`` of the driver's own error, without SQLAlchemy's extras."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


@dataclass(frozen=True)
class _Dialect:
    """How one kind of SQL instance is opened and locked."""

    engine_options: Callable[[URL, float], tuple[URL, dict[str, Any]]]
    lock: Callable[[sa.Connection, int | None], None]
    stamp_exists: str
    reading: Callable[[sa.Connection], AbstractContextManager[None]]
    prepare: Callable[[sa.Engine, float], None] = lambda engine, timeout: None
    lock_cleanup: Callable[[sa.Connection], None] = lambda conn: None


def _sqlite_options(url: URL, timeout: float) -> tuple[URL, dict[str, Any]]:
    path = url.database
    if not path or path == ":memory:":
        raise SettingsError("a SQLite instance needs a file path: sqlite:////path/to/file.db")
    # mode=rw: a missing file is "unreachable", never silently created empty.
    url = url.set(database=f"file:{path}", query={"mode": "rw", "uri": "true"})
    return url, {"connect_args": {"timeout": timeout, "check_same_thread": False}}


def _sqlite_transactional_ddl(engine: sa.Engine, timeout: float) -> None:
    # SQLAlchemy's documented recipe: stop pysqlite's own transaction handling (which
    # commits DDL on its own) and emit BEGIN IMMEDIATE ourselves, so a migration's DDL
    # and DML commit or roll back together and the write lock is taken up front.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")

    @event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        # a read of the stamp needs no write lock: a plain (deferred) BEGIN
        conn.exec_driver_sql("BEGIN" if conn.info.get("byod_read") else "BEGIN IMMEDIATE")


@contextlib.contextmanager
def _sqlite_reading(conn: sa.Connection) -> Iterator[None]:
    conn.info["byod_read"] = True
    try:
        with conn.begin():
            yield
    finally:
        conn.info.pop("byod_read", None)


@contextlib.contextmanager
def _postgres_reading(conn: sa.Connection) -> Iterator[None]:
    # autocommit: no BEGIN and COMMIT round trips around a read
    conn.execution_options(isolation_level="AUTOCOMMIT")
    try:
        yield
        conn.commit()
    finally:
        if conn.in_transaction():
            conn.rollback()
        conn.execution_options(isolation_level=conn.dialect.default_isolation_level)


def _sqlite_lock(conn: sa.Connection, timeout_ms: int | None) -> None:
    """BEGIN IMMEDIATE already holds the write lock; a deadline interrupts the work."""
    dbapi = conn.connection.dbapi_connection
    assert isinstance(dbapi, sqlite3.Connection)
    if timeout_ms is None:
        dbapi.set_progress_handler(None, 0)
        return
    ends = time.monotonic() + timeout_ms / 1000
    dbapi.set_progress_handler(lambda: int(time.monotonic() > ends), 10_000)


def _postgres_options(url: URL, timeout: float) -> tuple[URL, dict[str, Any]]:
    return url, {
        "connect_args": {"connect_timeout": max(1, round(timeout)), "application_name": "byod"}
    }


def _postgres_lock(conn: sa.Connection, timeout_ms: int | None) -> None:
    # one round trip: the server's own timeouts for this transaction, and the lock
    if timeout_ms is None:
        query = "SELECT pg_try_advisory_xact_lock(:key)"
        params: dict[str, object] = {"key": _PG_LOCK_KEY}
    else:
        query = (
            "SELECT pg_try_advisory_xact_lock(:key) "
            "FROM (SELECT set_config('statement_timeout', :ms, true), "
            "set_config('lock_timeout', :ms, true)) AS timeouts"
        )
        params = {"key": _PG_LOCK_KEY, "ms": str(timeout_ms)}
    taken = conn.execute(sa.text(query), params).scalar_one()
    if not taken:
        raise BusyError("another runner holds this instance's migration lock")


def _sqlite_unlock(conn: sa.Connection) -> None:
    with contextlib.suppress(SQLAlchemyError, AttributeError):
        _sqlite_lock(conn, None)


def _timed_out(exc: DBAPIError) -> bool:
    """The server (or SQLite's progress handler) stopped the work for a timeout."""
    orig = exc.orig
    if isinstance(orig, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable):
        return True
    return getattr(orig, "sqlite_errorcode", None) == sqlite3.SQLITE_INTERRUPT


def _timeout(step: Step, exc: DBAPIError) -> InstanceTimeoutError:
    return InstanceTimeoutError(
        f"{step.migration.id} {step.direction} was stopped by the timeout: {describe_error(exc)}"
    )


@functools.cache
def _create_stamp_sql(dialect: sa.Dialect) -> str:
    # DDL is never in SQLAlchemy's statement cache: compile it once per dialect
    return str(_CREATE_STAMP.compile(dialect=dialect))


_DIALECTS: dict[str, _Dialect] = {
    "sqlite": _Dialect(
        _sqlite_options,
        _sqlite_lock,
        f"SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '{STAMP_TABLE}'",
        _sqlite_reading,
        _sqlite_transactional_ddl,
        lock_cleanup=_sqlite_unlock,
    ),
    "postgresql": _Dialect(
        _postgres_options,
        _postgres_lock,
        f"SELECT to_regclass('{STAMP_TABLE}') IS NOT NULL",
        _postgres_reading,
    ),
}


#: What the next connection of a shared engine connects to (set around ``connect()``).
_target_args: contextvars.ContextVar[tuple[list[Any], dict[str, Any]]] = contextvars.ContextVar(
    "byod_target_args"
)
_engines: dict[tuple[object, ...], sa.Engine] = {}
_engines_lock = threading.Lock()


def _use_target_args(
    _dialect: sa.Dialect, _record: object, cargs: list[Any], cparams: dict[str, Any]
) -> None:
    args, params = _target_args.get()
    cargs[:] = args
    cparams.clear()
    cparams.update(params)


def _shared_engine(
    engine_url: URL, options: dict[str, Any], dialect: _Dialect, timeout: float
) -> sa.Engine:
    """One engine per kind of instance (not per instance): creating an engine and
    initialising its dialect costs queries; connections still go to each instance."""
    key = (engine_url.drivername, tuple(sorted(engine_url.query.items())), timeout)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = sa.create_engine(engine_url, poolclass=NullPool, **options)
            dialect.prepare(engine, timeout)
            event.listen(engine, "do_connect", _use_target_args)
            _engines[key] = engine
    return engine


def open_target(url: URL, *, timeout: float = 10.0) -> SqlTarget:
    """Connect to a SQL instance within ``timeout`` seconds.

    Raises :class:`SettingsError` for a kind of database byod does not support and
    :class:`UnreachableError` when the instance does not answer.
    """
    dialect = _DIALECTS.get(url.get_backend_name())
    if dialect is None:
        supported = ", ".join(sorted(_DIALECTS))
        raise SettingsError(
            f"instances of kind {url.get_backend_name()!r} are not supported (use {supported})"
        )
    engine_url, options = dialect.engine_options(url, timeout)
    try:
        engine = _shared_engine(engine_url, options, dialect, timeout)
        cargs, cparams = engine.dialect.create_connect_args(engine_url)
    except (SQLAlchemyError, ImportError) as exc:
        raise SettingsError(f"cannot use the instance URL {safe_url(url)}") from exc
    token = _target_args.set((list(cargs), {**cparams, **options.get("connect_args", {})}))
    try:
        conn = engine.connect()
    except SQLAlchemyError as exc:
        raise UnreachableError(
            f"instance {safe_url(url)} is unreachable: {describe_error(exc)}"
        ) from exc
    finally:
        _target_args.reset(token)
    return SqlTarget(engine, conn, dialect, where=safe_url(url))


class SqlTarget:
    """An open connection to one SQL instance; see :class:`byod.targets.base.Target`."""

    def __init__(self, engine: sa.Engine, conn: sa.Connection, dialect: _Dialect, where: str):
        self._engine = engine
        self._conn = conn
        self._dialect = dialect
        self.where = where

    def __enter__(self) -> SqlTarget:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read_stamp(self) -> list[StampEntry]:
        """What the instance says is applied, oldest first (empty for a fresh instance)."""
        try:
            with self._dialect.reading(self._conn):
                return self._select_stamp()
        except SQLAlchemyError as exc:
            raise self._lost("reading the stamp", exc) from exc

    def apply(self, step: Step, body: StepBody, deadline: float | None = None) -> bool:
        """See :meth:`byod.targets.base.Target.apply`."""
        timeout_ms = None
        if deadline is not None:
            timeout_ms = int((deadline - time.monotonic()) * 1000)
            if timeout_ms <= 0:
                raise InstanceTimeoutError(f"the timeout ran out before {step.migration.id}")
        try:
            transaction = self._conn.begin()
        except SQLAlchemyError as exc:
            raise self._busy_or_lost(exc) from exc
        try:
            self._dialect.lock(self._conn, timeout_ms)
            self._conn.exec_driver_sql(_create_stamp_sql(self._engine.dialect))
            if not self._check_position(step, self._select_stamp(known_to_exist=True)):
                transaction.rollback()
                return False
            try:
                body(self._conn)
            except ByodError:
                raise
            except DBAPIError as exc:
                if exc.connection_invalidated:
                    raise self._lost(f"running {step.migration.id}", exc) from exc
                if _timed_out(exc):
                    raise _timeout(step, exc) from exc
                raise MigrationFailedError(describe_error(exc)) from exc
            except Exception as exc:
                raise MigrationFailedError(describe_error(exc)) from exc
            if deadline is not None and time.monotonic() > deadline:
                raise InstanceTimeoutError(f"{step.migration.id} ran past the timeout")
            self._write_stamp(step)
        except DBAPIError as exc:
            self._rollback_quietly(transaction)
            if _timed_out(exc):
                raise _timeout(step, exc) from exc
            raise self._busy_or_lost(exc) from exc
        except BaseException:
            self._rollback_quietly(transaction)
            raise
        finally:
            if timeout_ms is not None:
                self._dialect.lock_cleanup(self._conn)
        try:
            transaction.commit()
        except SQLAlchemyError as exc:
            raise self._lost(f"committing {step.migration.id} (outcome unknown)", exc) from exc
        return True

    def close(self) -> None:
        """Close the connection (the engine is shared by every instance of its kind)."""
        self._conn.close()

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _rollback_quietly(transaction: sa.RootTransaction) -> None:
        if transaction.is_active:
            # if the connection is gone, the server rolls back on its own
            with contextlib.suppress(SQLAlchemyError):
                transaction.rollback()

    def _select_stamp(self, *, known_to_exist: bool = False) -> list[StampEntry]:
        if (
            not known_to_exist
            and not self._conn.exec_driver_sql(self._dialect.stamp_exists).scalar()
        ):
            return []
        rows = self._conn.execute(_SELECT_STAMP)
        return [StampEntry(**row._asdict()) for row in rows]

    def _check_position(self, step: Step, stamp: list[StampEntry]) -> bool:
        migration = step.migration
        applied = {entry.id for entry in stamp}
        current = stamp[-1].version if stamp else 0
        if step.direction == "up":
            if migration.id in applied:
                return False
            expected = migration.version - 1
        else:
            if migration.id not in applied:
                return False
            expected = migration.version
        if current != expected:
            raise DriftError(
                f"instance is at version {current} but {migration.id} ({step.direction}) "
                f"needs it at version {expected}: it changed under this run"
            )
        return True

    def _write_stamp(self, step: Step) -> None:
        migration = step.migration
        if step.direction == "up":
            # the primary key and the unique version refuse a second row for this step
            self._conn.execute(
                _stamp.insert().values(
                    id=migration.id,
                    version=migration.version,
                    checksum=migration.checksum,
                    applied_at=utcnow(),
                )
            )
            return
        deleted = self._conn.execute(_stamp.delete().where(_stamp.c.id == migration.id)).rowcount
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
