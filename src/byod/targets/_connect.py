"""Connections to SQL instances: one engine per kind of instance where the dialect
allows (creating an engine and initialising its dialect costs queries), each connection
still to its own instance."""

from __future__ import annotations

import contextvars
import threading
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from byod.errors import BusyError, SettingsError, UnreachableError
from byod.extras import needs
from byod.settings import safe_url
from byod.targets.dialects import Dialect

__all__ = ["connect", "describe_error"]

#: The server refused a connection for want of a free slot: PostgreSQL's SQLSTATE
#: too_many_connections (server, database or role limit); MySQL's and MariaDB's
#: ER_CON_COUNT_ERROR and ER_TOO_MANY_USER_CONNECTIONS
_PG_NO_SLOT = "53300"
_MYSQL_NO_SLOT = (1040, 1203)
_KIND_NAMES = {"postgresql": "PostgreSQL", "mysql": "MySQL or MariaDB", "sqlite": "SQLite"}


def _no_slot_free(exc: SQLAlchemyError) -> bool:
    orig = getattr(exc, "orig", None)
    if orig is None:
        return False
    if getattr(orig, "sqlstate", None) == _PG_NO_SLOT:
        return True
    if "too many connections" in str(orig).lower():  # libpq's refusal before a SQLSTATE
        return True
    code = orig.args[0] if orig.args else None
    return code in _MYSQL_NO_SLOT


def describe_error(exc: BaseException) -> str:
    """``ErrorClass: message`` of the driver's own error, without SQLAlchemy's extras."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


#: What the next connection of a shared engine connects to (set around ``connect()``).
_target_args: contextvars.ContextVar[tuple[list[Any], dict[str, Any]]] = contextvars.ContextVar(
    "byod_target_args"
)
_engines: dict[tuple[object, ...], sa.Engine] = {}
_engines_lock = threading.Lock()


def _use_target_args(
    _dialect: sa.Dialect, _record: object, cargs: list[Any], cparams: dict[str, Any]
) -> None:
    found = _target_args.get(None)
    if found is None:  # a lost connection is never silently reopened mid-step
        raise UnreachableError("the connection to the instance was lost")
    args, params = found
    cargs[:] = args
    cparams.clear()
    cparams.update(params)


def _new_engine(
    engine_url: URL, options: dict[str, Any], dialect: Dialect, timeout: float
) -> sa.Engine:
    engine = sa.create_engine(engine_url, poolclass=NullPool, **options)
    dialect.prepare(engine, timeout)
    event.listen(engine, "do_connect", _use_target_args)
    return engine


def _engine_for(
    engine_url: URL, options: dict[str, Any], dialect: Dialect, timeout: float
) -> sa.Engine:
    """One engine per kind of instance (not per instance) where the dialect allows:
    creating an engine and initialising its dialect costs queries; connections still
    go to each instance."""
    if not dialect.shared_engine:
        return _new_engine(engine_url, options, dialect, timeout)
    key = (engine_url.drivername, tuple(sorted(engine_url.query.items())), timeout)
    with _engines_lock:
        if key not in _engines:
            _engines[key] = _new_engine(engine_url, options, dialect, timeout)
        return _engines[key]


def connect(
    url: URL, dialect: Dialect, timeout: float, ssl_ca: str | None, address: str | None = None
) -> tuple[sa.Engine, sa.Connection]:
    """The engine for ``url``'s kind and a connection to the instance itself (at
    ``address``, the host's checked address, where given): :class:`SettingsError` for a
    URL the driver cannot use, :class:`UnreachableError` when the instance does not
    answer within ``timeout``."""
    try:
        with needs(f"a {_KIND_NAMES.get(url.get_backend_name(), 'SQL')} instance"):
            engine_url, options = dialect.engine_options(url, timeout, ssl_ca, address)
            engine = _engine_for(engine_url, options, dialect, timeout)
        cargs, cparams = engine.dialect.create_connect_args(engine_url)
    except (SQLAlchemyError, ImportError) as exc:
        raise SettingsError(f"cannot use the instance URL {safe_url(url)}") from exc
    token = _target_args.set((list(cargs), {**cparams, **options.get("connect_args", {})}))
    try:
        return engine, engine.connect()
    except SQLAlchemyError as exc:
        if _no_slot_free(exc):
            raise BusyError(
                f"instance {safe_url(url)} has no connection slot free (its server's "
                f"connection limit): {describe_error(exc)}"
            ) from exc
        raise UnreachableError(
            f"instance {safe_url(url)} is unreachable: {describe_error(exc)}"
        ) from exc
    finally:
        _target_args.reset(token)
