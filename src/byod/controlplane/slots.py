"""Slots per database server for distributed runs: PostgreSQL session advisory locks on
a control-plane connection, so a worker that dies gives its slot back with its
connection. Nothing is written to any table."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from byod.errors import ControlPlaneError

__all__ = ["server_slot"]

_TRY_LOCK = sa.text("SELECT pg_try_advisory_lock(:k, :s)")
_UNLOCK = sa.text("SELECT pg_advisory_unlock(:k, :s)")


@contextlib.contextmanager
def server_slot(engine: sa.Engine, server: str, slots: int) -> Iterator[bool]:
    """Hold one of ``slots`` slots for ``server`` (``host:port``) while the block runs;
    yields False when all are taken. :class:`ControlPlaneError` when the control plane
    cannot be reached for it."""
    key = zlib.crc32(server.encode()) - 2**31  # PostgreSQL's int4 range
    try:
        conn = engine.connect()
    except SQLAlchemyError as exc:
        raise ControlPlaneError("control plane: cannot take a server slot") from exc
    with conn:
        for slot in range(slots):
            try:
                taken = conn.execute(_TRY_LOCK, {"k": key, "s": slot}).scalar()
                conn.commit()  # the lock is the session's: no transaction left open
            except SQLAlchemyError as exc:
                raise ControlPlaneError("control plane: cannot take a server slot") from exc
            if taken:
                try:
                    yield True
                finally:
                    with contextlib.suppress(SQLAlchemyError):  # a lost session frees it
                        conn.execute(_UNLOCK, {"k": key, "s": slot})
                        conn.commit()
                return
    yield False
