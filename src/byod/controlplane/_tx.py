"""Control-plane connections that turn driver errors into :class:`ControlPlaneError`.

Round trips are the cost that matters on a remote control plane, so reads and
single-statement writes run in autocommit (one round trip each, no BEGIN/COMMIT); only
writes of several statements that must land together open a transaction.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from byod.errors import ControlPlaneError

__all__ = ["autocommit", "reading", "single", "writing"]


def _error(action: str, exc: SQLAlchemyError) -> ControlPlaneError:
    cause = getattr(exc, "orig", None) or exc
    return ControlPlaneError(f"control plane: cannot {action} ({type(cause).__name__})")


@functools.lru_cache(maxsize=64)
def _write_lock(engine: sa.Engine) -> contextlib.AbstractContextManager[object]:
    """SQLite has one writer at a time; threads of one process queue here instead of
    meeting SQLITE_BUSY, whose retry sleeps cost milliseconds. Other databases: no lock."""
    if engine.dialect.name == "sqlite":
        return threading.RLock()
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=64)
def autocommit(engine: sa.Engine) -> sa.Engine:
    """The same engine (and pool) with every statement committed on its own."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


@contextmanager
def writing(engine: sa.Engine, action: str) -> Iterator[sa.Connection]:
    """A short write transaction of several statements: all or nothing."""
    try:
        with _write_lock(engine), engine.begin() as conn:
            yield conn
    except SQLAlchemyError as exc:
        raise _error(action, exc) from exc


@contextmanager
def single(engine: sa.Engine, action: str) -> Iterator[sa.Connection]:
    """A connection for one atomic write statement (autocommit: one round trip)."""
    try:
        with _write_lock(engine), autocommit(engine).connect() as conn:
            yield conn
    except SQLAlchemyError as exc:
        raise _error(action, exc) from exc


@contextmanager
def reading(engine: sa.Engine, action: str) -> Iterator[sa.Connection]:
    """A connection for reads (autocommit: no BEGIN/ROLLBACK around them)."""
    try:
        with autocommit(engine).connect() as conn:
            yield conn
    except SQLAlchemyError as exc:
        raise _error(action, exc) from exc
