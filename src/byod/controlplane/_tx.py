"""Control-plane connections that turn driver errors into :class:`ControlPlaneError`.

Round trips are the cost that matters on a remote control plane, so reads and
single-statement writes run in autocommit (one round trip each, no BEGIN/COMMIT); only
writes of several statements that must land together open a transaction.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from byod.errors import ControlPlaneError

try:
    import fcntl
except ImportError:  # not a POSIX system: threads queue, processes meet SQLITE_BUSY
    fcntl = None  # type: ignore[assignment]

__all__ = ["autocommit", "insert_or", "reading", "single", "writing"]


def _error(action: str, exc: SQLAlchemyError) -> ControlPlaneError:
    cause = getattr(exc, "orig", None) or exc
    return ControlPlaneError(f"control plane: cannot {action} ({type(cause).__name__})")


class _WriterLock:
    """One writer at a time on a SQLite file, across threads (a lock) and processes (an
    ``flock`` on a file beside it, which wakes the next writer the moment it is free)."""

    def __init__(self, path: str | None) -> None:
        self._threads = threading.RLock()
        shared = fcntl is not None and path and path != ":memory:"
        self._path = f"{path}-writer" if shared else None
        self._fd: int | None = None
        self._depth = 0

    def __enter__(self) -> None:
        self._threads.acquire()
        self._depth += 1
        if self._depth > 1 or self._path is None:
            return
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError:  # a read-only folder, say: SQLite's own busy handling still holds
            self._path = None

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._fd is not None and self._path is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()


@functools.lru_cache(maxsize=64)
def _write_lock(engine: sa.Engine) -> contextlib.AbstractContextManager[object]:
    """SQLite has one writer at a time; writers of this control plane queue here, in
    this process and in the others (``--processes``, ``byod serve`` beside a run),
    instead of meeting SQLITE_BUSY, whose retry sleeps cost milliseconds each. Other
    databases: no lock."""
    if engine.dialect.name == "sqlite":
        return _WriterLock(engine.url.database)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=64)
def autocommit(engine: sa.Engine) -> sa.Engine:
    """The same engine (and pool) with every statement committed on its own. SQLite
    is in-process, with no round trips to save: its driver's own transaction handling
    (a write begins one, a read does not) costs less than switching the connection's
    isolation level at each checkout and back at each return."""
    if engine.dialect.name == "sqlite":
        return engine
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
            if engine.dialect.name == "sqlite":  # its driver began a transaction to write
                conn.commit()
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


def insert_or(engine: sa.Engine, table: sa.Table) -> sa.dialects.postgresql.Insert:
    """An INSERT into ``table`` in the control plane's own dialect, which can end
    ``ON CONFLICT`` (PostgreSQL and SQLite share the syntax). The dialect's module is
    imported here, on first use, not by every command that starts."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    return insert(table)
