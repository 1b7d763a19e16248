"""Control-plane transactions that turn driver errors into :class:`ControlPlaneError`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from byod.errors import ControlPlaneError

__all__ = ["reading", "writing"]


def _error(action: str, exc: SQLAlchemyError) -> ControlPlaneError:
    cause = getattr(exc, "orig", None) or exc
    return ControlPlaneError(f"control plane: cannot {action} ({type(cause).__name__})")


@contextmanager
def writing(engine: sa.Engine, action: str) -> Iterator[sa.Connection]:
    """One short write transaction: committed on success, rolled back on error."""
    try:
        with engine.begin() as conn:
            yield conn
    except SQLAlchemyError as exc:
        raise _error(action, exc) from exc


@contextmanager
def reading(engine: sa.Engine, action: str) -> Iterator[sa.Connection]:
    """A connection for reads."""
    try:
        with engine.connect() as conn:
            yield conn
    except SQLAlchemyError as exc:
        raise _error(action, exc) from exc
