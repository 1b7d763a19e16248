"""How each kind of SQL instance is opened, read, locked and timed out.

One entry per SQLAlchemy backend name in :data:`DIALECTS`; the SQL target looks its
dialect up by name. MySQL and MariaDB commit DDL on their own, so their migrations are
guarded by a "dirty" marker (see :mod:`byod.targets.sql`).
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from byod.errors import BusyError, SettingsError
from byod.targets._libpq import instance_parameters

__all__ = ["DIALECTS", "STAMP_TABLE", "Dialect", "table_exists", "timed_out"]

STAMP_TABLE = "byod_schema_stamp"
#: Advisory-lock key for PostgreSQL: one lock per database, shared by every byod runner.
_PG_LOCK_KEY = 0x62796F64
_PG_UNDEFINED_TABLE = "42P01"
#: Named lock for MySQL/MariaDB (per server: the name carries the database).
_MYSQL_LOCK = "byod_migrations"
_MARIADB_STATEMENT_TIMEOUT = 1969


@dataclass(frozen=True)
class Dialect:
    """How one kind of SQL instance is opened and locked."""

    #: (URL, timeout, operator's CA, checked address or None) -> the URL the engine
    #: uses and its options
    engine_options: Callable[[URL, float, str | None, str | None], tuple[URL, dict[str, Any]]]
    #: Take the instance's migration lock for this transaction, bound it by the timeout
    #: (ms); ``durable=False``: its commit need not wait for the disk (a backfill batch,
    #: whose cursor commits or is lost with its rows)
    lock: Callable[[sa.Connection, int | None, bool], None]
    #: one row (truthy) when the table named ``:name`` exists in the instance
    table_exists_sql: str
    reading: Callable[[sa.Connection], AbstractContextManager[None]]
    prepare: Callable[[sa.Engine, float], None] = lambda engine, timeout: None
    lock_cleanup: Callable[[sa.Connection], None] = lambda conn: None
    #: Bound each read and write of the client on this connection (None: unbounded),
    #: where the driver does not bound them itself
    io_timeout: Callable[[sa.Connection, float | None], None] = lambda conn, seconds: None
    #: DDL commits on its own (MySQL, MariaDB): a failed step may leave the instance dirty
    non_transactional_ddl: bool = False
    #: One engine for every instance of the kind; not where the dialect learns the
    #: "default schema" from its first connection (MySQL: the database itself)
    shared_engine: bool = True
    #: Where set, a backfill's batches take no lock of their own (the compare-and-set of
    #: their cursor keeps each batch once) and this puts, once per connection and inside
    #: a batch's transaction, the session's settings for them (the timeout in ms)
    batch_settings: Callable[[sa.Connection, int | None], None] | None = None
    #: Where a read outside a transaction may simply fail: tells, by the server's error
    #: code, that it failed for want of the table (then the stamp is read in one round
    #: trip, without asking first whether its table exists)
    missing_table: Callable[[DBAPIError], bool] | None = None
    #: Where set, a run's first step shares its transaction (or, where DDL commits on its
    #: own, its session lock) with the read of the stamp: this takes the lock like
    #: ``lock`` and tells which of the tables named exist, in one round trip
    lock_and_look: Callable[[sa.Connection, int | None, tuple[str, ...]], set[str]] | None = None
    #: Bound a transaction taken by ``lock_and_look`` by a later deadline (ms): SQLite's
    #: progress handler, MariaDB's statement time; elsewhere nothing
    rebound: Callable[[sa.Connection, int | None], None] = lambda conn, timeout_ms: None
    #: Give back a lock held for the session (MySQL's named lock) before closing
    release: Callable[[sa.Connection], None] = lambda conn: None


def table_exists(dialect: Dialect, name: str) -> sa.TextClause:
    """The dialect's query for whether table ``name`` exists (the name bound, never
    spliced into the SQL)."""
    return sa.text(dialect.table_exists_sql).bindparams(name=name)


def _sqlite_options(
    url: URL, timeout: float, _ssl_ca: str | None, _address: str | None
) -> tuple[URL, dict[str, Any]]:
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


_SQLITE_TABLES = sa.text(
    "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN :names"
).bindparams(sa.bindparam("names", expanding=True))


def _sqlite_lock_and_look(
    conn: sa.Connection, timeout_ms: int | None, names: tuple[str, ...]
) -> set[str]:
    """BEGIN IMMEDIATE holds the lock; the deadline is set by ``rebound`` for the step."""
    return set(conn.execute(_SQLITE_TABLES, {"names": list(names)}).scalars())


def _sqlite_lock(conn: sa.Connection, timeout_ms: int | None, durable: bool = True) -> None:
    """BEGIN IMMEDIATE already holds the write lock; a deadline interrupts the work."""
    dbapi = conn.connection.dbapi_connection
    assert isinstance(dbapi, sqlite3.Connection)
    if timeout_ms is None:
        dbapi.set_progress_handler(None, 0)
        return
    ends = time.monotonic() + timeout_ms / 1000
    dbapi.set_progress_handler(lambda: int(time.monotonic() > ends), 10_000)


def _postgres_options(
    url: URL, timeout: float, ssl_ca: str | None, address: str | None
) -> tuple[URL, dict[str, Any]]:
    # nothing of the operator's libpq environment reaches a tenant's server (see _libpq)
    args = instance_parameters(url, ssl_ca, address)
    # psycopg bounds the whole connection attempt (handshake included) by connect_timeout
    args |= {"connect_timeout": max(1, round(timeout)), "application_name": "byod"}
    # no hstore lookup at the first connect (four round trips while every other worker
    # waits): the engine is shared by every instance, and an OID found in the first
    # instance's database would be wrong in the next; HSTORE columns still work
    return url, {"connect_args": args, "use_native_hstore": False}


def _postgres_lock(conn: sa.Connection, timeout_ms: int | None, durable: bool = True) -> None:
    # one round trip: the server's own settings for this transaction, and the lock
    settings = [] if timeout_ms is None else ["statement_timeout", "lock_timeout"]
    query = _pg_lock_sql(tuple(settings), durable)
    params: dict[str, object] = {"key": _PG_LOCK_KEY, "ms": str(timeout_ms)}
    taken = conn.execute(query, params).scalar_one()
    if not taken:
        raise BusyError("another runner holds this instance's migration lock")


def _postgres_lock_and_look(
    conn: sa.Connection, timeout_ms: int | None, names: tuple[str, ...]
) -> set[str]:
    # one round trip: the settings and the lock as in _postgres_lock, and the tables
    settings = () if timeout_ms is None else ("statement_timeout", "lock_timeout")
    query = _pg_lock_sql(settings, True, len(names))
    params: dict[str, object] = {"key": _PG_LOCK_KEY, "ms": str(timeout_ms)}
    params |= {f"t{n}": name for n, name in enumerate(names)}
    taken, *present = conn.execute(query, params).one()
    if not taken:
        raise BusyError("another runner holds this instance's migration lock")
    return {name for name, there in zip(names, present, strict=True) if there}


@functools.cache
def _pg_lock_sql(timeouts: tuple[str, ...], durable: bool, tables: int = 0) -> sa.TextClause:
    """The lock, with ``set_config`` of the transaction's timeouts (``:ms``) and of its
    commit: durable, whatever the batches before it set (see _postgres_batch_settings);
    and whether each table ``:t0``, ``:t1``, … exists."""
    configs = [f"set_config('{name}', :ms, true)" for name in timeouts]
    configs.append(f"set_config('synchronous_commit', '{'on' if durable else 'off'}', true)")
    looks = "".join(f", to_regclass(:t{n}) IS NOT NULL" for n in range(tables))
    return sa.text(
        f"SELECT pg_try_advisory_xact_lock(:key){looks} "
        f"FROM (SELECT {', '.join(configs)}) AS settings"
    )


def _postgres_batch_settings(conn: sa.Connection, timeout_ms: int | None) -> None:
    """The session's timeouts for a run of batches (0: none), and commits that need
    not wait for the disk: a crash of the server may then lose the last batches'
    commits, each with its own cursor (so a re-run redoes exactly those), and the
    step's finalize commits durably, flushing every batch before it."""
    conn.execute(
        sa.text(
            "SELECT set_config('statement_timeout', :ms, false), "
            "set_config('lock_timeout', :ms, false), "
            "set_config('synchronous_commit', 'off', false)"
        ),
        {"ms": str(timeout_ms or 0)},
    )


def _sqlite_unlock(conn: sa.Connection) -> None:
    if conn.closed or conn.invalidated:
        return  # touching it would reconnect: a lost connection has no handler to clear
    with contextlib.suppress(SQLAlchemyError, AttributeError):
        _sqlite_lock(conn, None)


def timed_out(exc: DBAPIError) -> bool:
    """The server (or SQLite's progress handler) stopped the work for a timeout."""
    orig = exc.orig
    # PostgreSQL's query_canceled and lock_not_available (psycopg's QueryCanceled and
    # LockNotAvailable), by SQLSTATE: psycopg itself is imported only by a PostgreSQL run
    if getattr(orig, "sqlstate", None) in ("57014", "55P03"):
        return True
    if getattr(orig, "sqlite_errorcode", None) == sqlite3.SQLITE_INTERRUPT:
        return True
    code = orig.args[0] if orig is not None and orig.args else None
    return code == _MARIADB_STATEMENT_TIMEOUT


def _mysql_options(
    url: URL, timeout: float, ssl_ca: str | None, address: str | None
) -> tuple[URL, dict[str, Any]]:
    if not url.database:
        raise SettingsError("a MySQL/MariaDB instance URL must name its database")
    # PyMySQL's connect_timeout covers the TCP connect only: a server that accepts and
    # never greets would be waited on forever, so reads and writes are bounded too
    # (until a step sets its own bound, see io_timeout); LOCAL INFILE is off whatever
    # the URL says (it lets the server read byod's files)
    args: dict[str, Any] = {
        "connect_timeout": max(1, round(timeout)),
        "read_timeout": timeout,
        "write_timeout": timeout,
        "local_infile": False,
    }
    if address:
        args["host"] = address  # the address that was checked, never the name again
    mode = str(url.query.get("ssl_mode", "preferred")).lower()
    if mode == "disabled":
        args["ssl_disabled"] = True
    elif mode != "preferred":  # PyMySQL's own default: TLS when the server offers it
        args["ssl"] = _mysql_tls(mode, ssl_ca, url.host or "")
    # one engine, one connection, closed with its target: no ROLLBACK before the close
    options = {"connect_args": args, "pool_reset_on_return": None}
    return url.difference_update_query(["ssl_mode"]), options


class _NamedContext(ssl.SSLContext):
    """A TLS context that names the URL's host to the server (SNI) and checks the
    certificate against it, while the socket goes to the checked address (PyMySQL would
    give the TLS layer the host it connected to: the address)."""

    server_name: str = ""

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(*args, **kwargs)


def _mysql_tls(mode: str, ssl_ca: str | None, host: str) -> ssl.SSLContext:
    """The TLS context for a MySQL ``ssl_mode``: ``required`` encrypts without checking
    the certificate; ``verify_ca`` checks it against the operator's CA (or the system's
    store); ``verify_identity`` also checks the URL's host name."""
    cafile = None if ssl_ca in (None, "system") else ssl_ca
    context = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
    context.server_name = host
    if cafile:
        context.load_verify_locations(cafile=cafile)
    else:
        context.load_default_certs()
    context.check_hostname = mode == "verify_identity"
    if mode == "required":
        context.verify_mode = ssl.CERT_NONE
    return context


def _mysql_io_timeout(conn: sa.Connection, seconds: float | None) -> None:
    # PyMySQL reads these before each socket read / write; it has no public setter
    if conn.closed or conn.invalidated:
        return  # touching it would reconnect: a lost connection needs no timeout
    with contextlib.suppress(AttributeError, SQLAlchemyError):
        dbapi = conn.connection.dbapi_connection
        dbapi._read_timeout = seconds  # type: ignore[union-attr]  # PyMySQL's own knob
        dbapi._write_timeout = seconds  # type: ignore[union-attr]


def _mysql_lock(conn: sa.Connection, timeout_ms: int | None, durable: bool = True) -> None:
    # GET_LOCK is a session lock, not a transaction lock: taken once, held across the
    # steps (and their DDL's own commits) until _mysql_release or the session's end
    if "byod_mysql_lock" not in conn.info:
        name = f"{_MYSQL_LOCK}:{conn.engine.url.database}"
        taken = conn.execute(sa.text("SELECT GET_LOCK(:name, 0)"), {"name": name}).scalar()
        if taken != 1:
            raise BusyError("another runner holds this instance's migration lock")
        conn.info["byod_mysql_lock"] = name
    _mariadb_bound(conn, timeout_ms)


def _mariadb_bound(conn: sa.Connection, timeout_ms: int | None) -> None:
    """MariaDB's own bound on each statement of the step (MySQL has none for DDL)."""
    if timeout_ms is not None and getattr(conn.dialect, "is_mariadb", False):
        conn.execute(
            sa.text("SET SESSION max_statement_time = :seconds"),
            {"seconds": max(timeout_ms, 1) / 1000},
        )
        conn.info["byod_mariadb_bound"] = True


_MYSQL_TABLES = (
    "(SELECT GROUP_CONCAT(table_name SEPARATOR ' ') FROM information_schema.tables "
    "WHERE table_schema = DATABASE() AND table_name IN :names)"
)


def _mysql_lock_and_look(
    conn: sa.Connection, timeout_ms: int | None, names: tuple[str, ...]
) -> set[str]:
    """The session lock and which of the tables exist, in one round trip."""
    held = "byod_mysql_lock" in conn.info  # by this session already
    query = sa.text(f"SELECT {'1' if held else 'GET_LOCK(:lock, 0)'}, {_MYSQL_TABLES}")
    name = f"{_MYSQL_LOCK}:{conn.engine.url.database}"
    statement = query.bindparams(sa.bindparam("names", expanding=True))
    taken, found = conn.execute(statement, {"lock": name, "names": list(names)}).one()
    if taken != 1:
        raise BusyError("another runner holds this instance's migration lock")
    conn.info["byod_mysql_lock"] = name
    _mariadb_bound(conn, timeout_ms)
    if isinstance(found, bytes):
        found = found.decode()
    return set(str(found or "").split())


def _mysql_unbound(conn: sa.Connection) -> None:
    """After a step or batch: MariaDB's bound taken off, if one was set (the lock stays)."""
    if conn.info.pop("byod_mariadb_bound", None) is None:
        return
    with contextlib.suppress(SQLAlchemyError):
        conn.exec_driver_sql("SET SESSION max_statement_time = 0")
        if conn.in_transaction():
            conn.commit()


def _mysql_release(conn: sa.Connection) -> None:
    """Give the session lock back before the connection closes (the server would at the
    session's end too, but only once it has processed the disconnect)."""
    name = conn.info.pop("byod_mysql_lock", None)
    if name is None or conn.closed or conn.invalidated:
        return
    # on the driver's own cursor: no transaction of SQLAlchemy's begun (and rolled back)
    with contextlib.suppress(Exception):
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute("SELECT RELEASE_LOCK(%s)", (name,))
            cursor.fetchall()
        finally:
            cursor.close()


@contextlib.contextmanager
def _plain_reading(conn: sa.Connection) -> Iterator[None]:
    with conn.begin():
        yield


DIALECTS: dict[str, Dialect] = {
    "sqlite": Dialect(
        _sqlite_options,
        _sqlite_lock,
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :name",
        _sqlite_reading,
        _sqlite_transactional_ddl,
        lock_cleanup=_sqlite_unlock,
        lock_and_look=_sqlite_lock_and_look,
        rebound=_sqlite_lock,
    ),
    "postgresql": Dialect(
        _postgres_options,
        _postgres_lock,
        "SELECT to_regclass(:name) IS NOT NULL",
        _postgres_reading,
        batch_settings=_postgres_batch_settings,
        missing_table=lambda exc: getattr(exc.orig, "sqlstate", None) == _PG_UNDEFINED_TABLE,
        lock_and_look=_postgres_lock_and_look,
    ),
    "mysql": Dialect(
        _mysql_options,
        _mysql_lock,
        "SELECT 1 FROM information_schema.tables WHERE table_schema = DATABASE() "
        "AND table_name = :name",
        _plain_reading,
        lock_cleanup=_mysql_unbound,
        io_timeout=_mysql_io_timeout,
        non_transactional_ddl=True,
        shared_engine=False,
        lock_and_look=_mysql_lock_and_look,
        rebound=_mariadb_bound,
        release=_mysql_release,
    ),
}
DIALECTS["mariadb"] = DIALECTS["mysql"]
