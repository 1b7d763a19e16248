"""The control plane's tables (SQLAlchemy Core) and how to open its database.

``byod_configs`` is indexed on (connection_status, schema_version, user_id) so "connected
and older than version V" is an index range scan, paged by user id.

``byod_control_plane`` holds one row, the control plane's random id, written once by
:func:`create_tables` (``byod init``) and never changed: a URL cannot tell that an
instance is the control plane itself, its id can (an instance holding it is refused).
"""

from __future__ import annotations

import functools
import secrets
import sqlite3
import threading
from pathlib import Path
from typing import Any, Literal, get_args

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError

from byod.clock import utcnow
from byod.errors import ControlPlaneError
from byod.extras import needs
from byod.settings import normalize_url, safe_url
from byod.targets.base import CONTROL_PLANE_TABLE

__all__ = [
    "CONNECTION_STATUSES",
    "CONTROL_PLANE_TABLE",
    "DIRECTIONS",
    "LEDGER_STATUSES",
    "RUN_KINDS",
    "RUN_STATES",
    "TASK_STATES",
    "ConnectionStatus",
    "Direction",
    "LedgerStatus",
    "RunKind",
    "RunState",
    "accepted_checksums",
    "applied_checksums",
    "configs",
    "control_plane",
    "control_plane_file",
    "control_plane_id",
    "create_tables",
    "ledger",
    "metadata",
    "open_engine",
    "run_tasks",
    "runs",
    "users",
    "utcnow",
]


def _one_of(column: str, values: tuple[str, ...], name: str) -> sa.CheckConstraint:
    """A CHECK that ``column`` holds one of ``values`` (the tuple is the one list)."""
    return sa.CheckConstraint(f"{column} IN ({', '.join(repr(v) for v in values)})", name=name)


#: Each value list is a ``Literal`` (what the HTTP API's document enumerates) and its
#: tuple (what the tables' CHECK constraints hold): one list.
ConnectionStatus = Literal["pending", "connected", "error", "disconnected"]
CONNECTION_STATUSES: tuple[ConnectionStatus, ...] = get_args(ConnectionStatus)
LedgerStatus = Literal["pending", "running", "completed", "failed", "skipped"]
LEDGER_STATUSES: tuple[LedgerStatus, ...] = get_args(LedgerStatus)
Direction = Literal["up", "down"]
DIRECTIONS: tuple[Direction, ...] = get_args(Direction)

metadata = sa.MetaData()

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("clerk_id", sa.String(255), nullable=False, unique=True),
    sa.Column("email", sa.String(320), nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    #: set by ``byod users remove``: the clerk id is then a tombstone (see Directory)
    sa.Column("removed_at", sa.DateTime, nullable=True),
)

configs = sa.Table(
    "byod_configs",
    metadata,
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), primary_key=True),
    sa.Column("target_kind", sa.String(32), nullable=False),
    sa.Column("sealed_url", sa.Text, nullable=False),
    sa.Column("sealed_secret", sa.Text, nullable=True),
    sa.Column("key_id", sa.String(32), nullable=False),
    sa.Column("connection_status", sa.String(16), nullable=False, server_default="pending"),
    sa.Column("schema_version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", sa.DateTime, nullable=True),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    #: the task queue whose workers can reach this instance (distributed runs)
    sa.Column("queue", sa.String(64), nullable=True),
    _one_of("connection_status", CONNECTION_STATUSES, "ck_byod_configs_status"),
    sa.Index("ix_byod_configs_status_version", "connection_status", "schema_version", "user_id"),
)

ledger = sa.Table(
    "byod_migrations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("migration_id", sa.String(255), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("direction", sa.String(4), nullable=False, server_default="up"),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Column("started_at", sa.DateTime, nullable=True),
    sa.Column("completed_at", sa.DateTime, nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    #: a phased step's rows done by its backfills (recorded every few seconds and at the end)
    sa.Column("rows_done", sa.BigInteger, nullable=True),
    #: its estimate of the rows in all (counted when its schema change was done)
    sa.Column("rows_total", sa.BigInteger, nullable=True),
    #: how its backfills' page sizes went when a page hit the instance's transaction
    #: limit (Convex; None: every page fit its declared size)
    sa.Column("page_sizes", sa.Text, nullable=True),
    _one_of("status", LEDGER_STATUSES, "ck_byod_migrations_status"),
    _one_of("direction", DIRECTIONS, "ck_byod_migrations_direction"),
    sa.Index("ix_byod_migrations_user", "user_id", "id"),
    sa.Index("ix_byod_migrations_migration", "migration_id"),
    sa.Index("ix_byod_migrations_user_migration", "user_id", "migration_id"),
    sa.Index("ix_byod_migrations_status", "status", "id"),
    sa.Index("ix_byod_migrations_run", "run_id"),
)


RunState = Literal["running", "completed", "halted", "interrupted"]
RUN_STATES: tuple[RunState, ...] = get_args(RunState)
#: what a run does (no CHECK: older control planes hold these three already)
RunKind = Literal["migrate", "rollback", "rehearse"]
RUN_KINDS: tuple[RunKind, ...] = get_args(RunKind)

runs = sa.Table(
    "byod_runs",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("started_by", sa.String(255), nullable=False),
    sa.Column("options", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("target_version", sa.Integer, nullable=True),
    sa.Column("undoes", sa.String(40), nullable=True),
    sa.Column("total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("succeeded", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    #: runs recorded before ``busy`` and ``up_to_date`` counted both here; read as
    #: ``up_to_date`` (never written any more)
    sa.Column("skipped", sa.Integer, nullable=False, server_default="0"),
    sa.Column("not_started", sa.Integer, nullable=False, server_default="0"),
    sa.Column("not_eligible", sa.Integer, nullable=False, server_default="0"),
    sa.Column("planned", sa.Integer, nullable=True),
    sa.Column("halt_reason", sa.Text, nullable=True),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Column("ended_at", sa.DateTime, nullable=True),
    # distributed runs: how far the selection has been handed to the task queue
    sa.Column("dispatched", sa.Integer, nullable=False, server_default="0"),
    sa.Column("in_flight", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cursor_version", sa.Integer, nullable=True),
    sa.Column("cursor_user", sa.Integer, nullable=True),
    sa.Column("exhausted", sa.Boolean, nullable=False, server_default=sa.false()),
    # added after the first release (``byod init`` adds them to older control planes)
    sa.Column("busy", sa.Integer, nullable=False, server_default="0"),
    sa.Column("up_to_date", sa.Integer, nullable=False, server_default="0"),
    _one_of("state", RUN_STATES, "ck_byod_runs_state"),
    sa.Index("ix_byod_runs_started", "started_at"),
)

TASK_STATES = ("queued", "running", "done")

#: One row per user a distributed run handed to the task queue: what makes a redelivered
#: or duplicated task a no-op, and what lets any machine follow the run.
run_tasks = sa.Table(
    "byod_run_tasks",
    metadata,
    sa.Column("run_id", sa.String(40), sa.ForeignKey("byod_runs.id"), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), primary_key=True),
    sa.Column("queue", sa.String(64), nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("from_version", sa.Integer, nullable=False),
    sa.Column("to_version", sa.Integer, nullable=True),
    sa.Column("outcome", sa.String(16), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("error_type", sa.String(64), nullable=True),
    sa.Column("steps", sa.Text, nullable=True),
    sa.Column("tries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("deliveries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("worker", sa.String(128), nullable=True),
    sa.Column("seconds", sa.Float, nullable=True),
    sa.Column("queued_at", sa.DateTime, nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=True),
    sa.Column("finished_at", sa.DateTime, nullable=True),
    _one_of("state", TASK_STATES, "ck_byod_run_tasks_state"),
    sa.Index("ix_byod_run_tasks_state", "run_id", "state"),
    sa.Index("ix_byod_run_tasks_finished", "run_id", "finished_at"),
)


#: The checksum each migration had when it was first applied anywhere in the fleet: a
#: fleet run compares the folder with it once, up front (see ``controlplane.checksums``).
applied_checksums = sa.Table(
    "byod_checksums",
    metadata,
    sa.Column("migration_id", sa.String(255), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("checksum", sa.String(64), nullable=False),
    #: the file's bytes' checksum then (what older stamps hold)
    sa.Column("legacy_checksum", sa.String(64), nullable=True),
    sa.Column("recorded_at", sa.DateTime, nullable=False),
)


#: Each time an operator accepted an applied migration's changed file (``verify --accept``)
accepted_checksums = sa.Table(
    "byod_accepted_checksums",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("migration_id", sa.String(255), nullable=False),
    sa.Column("old_checksum", sa.String(64), nullable=True),
    sa.Column("new_checksum", sa.String(64), nullable=False),
    sa.Column("users", sa.Integer, nullable=False),
    sa.Column("accepted_by", sa.String(255), nullable=False),
    sa.Column("accepted_at", sa.DateTime, nullable=False),
)


#: The fleet's gates: a gated migration (a contract step) runs on no user until an operator
#: opens it, every eligible user being through the steps before it; closing it again (every
#: user back before it) lets rollbacks cross below it. No row: never opened.
gates = sa.Table(
    "byod_gates",
    metadata,
    sa.Column("migration_id", sa.String(255), primary_key=True),
    sa.Column("state", sa.String(8), nullable=False),
    sa.Column("changed_by", sa.String(255), nullable=False),
    sa.Column("changed_at", sa.DateTime, nullable=False),
    #: byod ids of the users left behind when it was opened (or closed), comma-separated
    sa.Column("excluded", sa.Text, nullable=True),
    _one_of("state", ("open", "closed"), "ck_byod_gates_state"),
)


#: One row (``slot`` 1): this control plane's id; two concurrent ``init`` cannot both write.
control_plane = sa.Table(
    CONTROL_PLANE_TABLE,
    metadata,
    sa.Column("slot", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.CheckConstraint("slot = 1", name="ck_byod_control_plane_slot"),
)


#: Most connections one byod process keeps to the control plane.
POOL_SIZE = 32


def open_engine(url: str) -> sa.Engine:
    """An engine on the control plane; SQLite gets WAL and a busy timeout for many workers.

    Its pool holds at most :data:`POOL_SIZE` connections, opened as needed and kept: a
    worker holds one only for a statement or two, so beyond that many workers wait their
    turn (milliseconds) rather than open and close a connection each time (a new
    connection costs several round trips; a server has a connection budget).
    """
    parsed = normalize_url(url)
    # no pre-ping: it would cost a round trip per checkout; stale connections are recycled
    kwargs: dict[str, Any] = {"pool_recycle": 600, "pool_size": POOL_SIZE, "max_overflow": 0}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    if parsed.get_backend_name() == "postgresql":
        kwargs["use_native_hstore"] = False  # no type lookup at the first connect
    try:
        with needs("a PostgreSQL control plane"):
            engine = sa.create_engine(parsed, **kwargs)
    except (SQLAlchemyError, ImportError) as exc:
        raise ControlPlaneError(f"cannot open the control plane {safe_url(parsed)}") from exc
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def require_tables(engine: sa.Engine) -> None:
    """Raise :class:`ControlPlaneError` unless ``byod init`` has made every table here."""
    url = engine.url
    where = safe_url(url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        raise ControlPlaneError(f"no control plane at {where}: run `byod init` first")
    try:
        present = set(sa.inspect(engine).get_table_names())
    except SQLAlchemyError as exc:
        raise ControlPlaneError(f"cannot reach the control plane {where}") from exc
    if users.name not in present:
        raise ControlPlaneError(f"the control plane {where} lacks its tables: run `byod init`")
    try:  # tables and nullable columns added since an earlier byod: made as `init` does
        if set(metadata.tables) - present:
            metadata.create_all(engine, checkfirst=True)
        _add_missing_columns(engine)
    except SQLAlchemyError as exc:
        raise ControlPlaneError(
            f"the control plane {where} lacks columns this byod adds, and they could not be "
            "added: run `byod init`"
        ) from exc


def create_tables(engine: sa.Engine) -> None:
    """Create the control-plane tables, indexes and columns that are missing (safe to run
    again: a control plane made by an earlier byod gets the columns added since)."""
    try:
        metadata.create_all(engine, checkfirst=True)
        _add_missing_columns(engine)
        _write_id(engine)
    except SQLAlchemyError as exc:
        raise ControlPlaneError(
            f"cannot create the control-plane tables in {safe_url(engine.url)}: "
            f"{type(getattr(exc, 'orig', None) or exc).__name__}"
        ) from exc


def _add_missing_columns(engine: sa.Engine) -> None:
    """Columns added to a table after its creation (each nullable or with a default)."""
    inspector = sa.inspect(engine)
    missing = []
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        missing += [(table.name, c) for c in table.columns if c.name not in present]
    if not missing:
        return
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    with engine.begin() as conn:
        operations = Operations(MigrationContext.configure(connection=conn))
        for table_name, column in missing:
            operations.add_column(table_name, column._copy())


def _write_id(engine: sa.Engine) -> None:
    """Give the control plane its id, once (an existing id is kept)."""
    with engine.connect() as conn:
        if conn.execute(sa.select(control_plane.c.id)).first() is not None:
            return
        conn.rollback()
        try:
            with conn.begin():
                conn.execute(
                    control_plane.insert().values(
                        slot=1, id=secrets.token_hex(16), created_at=utcnow()
                    )
                )
        except sa.exc.IntegrityError:
            pass  # another init wrote it first: that id stands


def control_plane_id(engine: sa.Engine) -> str | None:
    """This control plane's id, or None before ``byod init`` gave it one (or when it
    cannot be read: the tables' absence is reported by whoever needs them)."""
    try:
        with _ID_LOCK:  # the first workers of a run would all ask at once
            return _known_id(engine)
    except LookupError:
        return None


_ID_LOCK = threading.Lock()


#: control plane id -> its SQLite file ("" for a server or in-memory one), for each control
#: plane whose id this process has read
_FILES: dict[str, str] = {}


def control_plane_file(control_plane: str) -> str | None:
    """The SQLite file of the control plane with this id ("": it is not a SQLite file; None:
    this process has not read that control plane's id)."""
    return _FILES.get(control_plane)


@functools.lru_cache(maxsize=64)
def _known_id(engine: sa.Engine) -> str:
    # an id never changes once written: read once per engine (an absent one is not cached)
    try:
        with engine.connect() as conn:
            found = conn.execute(sa.select(control_plane.c.id)).scalar()
    except SQLAlchemyError as exc:
        raise LookupError(CONTROL_PLANE_TABLE) from exc
    if found is None:
        raise LookupError(CONTROL_PLANE_TABLE)
    database = engine.url.database or ""
    sqlite_file = engine.dialect.name == "sqlite" and database not in ("", ":memory:")
    _FILES[str(found)] = database if sqlite_file else ""
    return str(found)
