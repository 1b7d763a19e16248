"""What a migration's functions get: their context (the transaction's connection and
Alembic's ``Operations`` on it, or a Convex deployment's functions; the user), inside
the transaction a target opens."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import sqlalchemy as sa

from byod.controlplane import User
from byod.errors import MigrationFailedError
from byod.registry import FunctionCalls, Kind, MigrationContext, MigrationFn, Step
from byod.targets.base import BatchBody, Session, StepBody

__all__ = ["Bodies"]


class Bodies:
    """The work of one user's steps, as the target runs it in its transactions."""

    def __init__(
        self, engine: sa.Engine, user: User, kind: str, app: FunctionCalls | None = None
    ) -> None:
        self.engine = engine
        self.user = user
        self.kind = kind
        self.app = app

    def step(self, step: Step, function: MigrationFn | None = None) -> StepBody:
        """A step's work (``up`` or ``down``, or ``function``) for its transaction."""
        if function is None:
            function = step.migration.up if step.direction == "up" else step.migration.down
        assert function is not None  # irreversible plans are refused before this
        call = function

        def body(session: Session) -> None:
            context = self._context(step, session)
            _guarded(step, lambda: call(context))

        return body

    def batch(self, step: Step, index: int) -> BatchBody:
        """A backfill batch's work, given its rows, for the batch's transaction."""
        work = step.migration.backfills_for(step.direction)[index]
        made: dict[int, MigrationContext] = {}  # one context per connection, not per batch

        def body(conn: sa.Connection, rows: Sequence[Any]) -> None:
            apply = work.apply
            if apply is None:  # a Convex target runs the page mutation, never this
                raise MigrationFailedError(
                    f"{step.migration.id}: the backfill of {work.table} names a Convex page "
                    f"mutation ({work.page}), but this instance is {self.kind}: a SQL "
                    "backfill gives key= and apply="
                )
            context = made.get(id(conn))
            if context is None or context.conn is not conn:
                context = made[id(conn)] = self._context(step, conn)
            _guarded(step, lambda: apply(context, rows))

        return body

    def _context(self, step: Step, session: Session) -> MigrationContext:
        logger = logging.LoggerAdapter(
            logging.getLogger("byod.migration"),
            {"user_id": self.user.id, "migration_id": step.migration.id},
        )
        conn, convex = (session, None) if isinstance(session, sa.Connection) else (None, session)
        return MigrationContext(
            kind=cast(Kind, self.kind),
            conn=conn,
            convex=convex,
            app=self.app,
            main=self.engine,
            user_id=self.user.id,
            clerk_id=self.user.clerk_id,
            log=logger,
        )


def _guarded(step: Step, call: Callable[[], None]) -> None:
    """Run a migration's own code. What it raises that is not an ``Exception`` (a
    ``BaseException`` of its own, ``sys.exit``) is the step's failure like any other,
    never the end of the run or the process; only Ctrl-C goes on up."""
    try:
        call()
    except (Exception, KeyboardInterrupt, GeneratorExit):
        raise
    except SystemExit as exc:
        raise MigrationFailedError(
            f"{step.migration.id} called sys.exit({exc.code!r}); a migration must return or raise"
        ) from exc
    except BaseException as exc:
        text = str(exc).strip()
        raise MigrationFailedError(
            f"{type(exc).__name__}: {text} (a BaseException, not an Exception)"
            if text
            else f"{type(exc).__name__} (a BaseException, not an Exception)"
        ) from exc
