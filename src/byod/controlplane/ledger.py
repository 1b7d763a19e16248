"""The ledger: the control plane's record of every migration attempt for every user.

One row per planned step of one run; rows are never overwritten by a later run, so a
user's history keeps every earlier attempt. What each status means:

* ``pending``   planned by a run, not started yet.
* ``running``   started; the instance transaction may be open. Only a runner that holds
                the user's lease has ``running`` rows; a dead runner's rows are settled
                by the next run (``completed`` if the instance's stamp has the step,
                ``failed`` "interrupted: runner lost" otherwise).
* ``completed`` done on the instance (its stamp written in the same transaction) and
                recorded here together with the config's ``schema_version``.
* ``failed``    the attempt failed; its instance changes were rolled back.
* ``skipped``   planned but never started: an earlier step failed or the run stopped.

``attempts`` on a row is the attempt number of that step for that user and direction
(1 for the first time it ran).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from byod.controlplane._tx import single, writing
from byod.controlplane.schema import configs, ledger, utcnow
from byod.errors import ControlPlaneError
from byod.registry import Direction, Plan

__all__ = ["Ledger", "LedgerRow"]

_ERROR_LIMIT = 2000


@dataclass(frozen=True)
class LedgerRow:
    """One ledger row, as read back."""

    id: int
    user_id: int
    migration_id: str
    version: int
    direction: str
    status: str
    error: str | None
    attempts: int
    run_id: str | None
    started_at: datetime | None
    completed_at: datetime | None
    created_at: datetime


class Ledger:
    """The one writer of ``byod_migrations`` (and of ``schema_version`` on success).

    Every write is one statement in autocommit where it can be, so a step costs two
    control-plane round trips: "started", and "completed" (which also starts the next
    step, and on the last step gives the lease back). On PostgreSQL "completed" is one
    statement (data-modifying CTEs); elsewhere one short transaction.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._one_statement = engine.dialect.name == "postgresql"

    def record_planned(self, user_id: int, plan: Plan, run_id: str | None) -> list[int]:
        """Write one ``pending`` row per step of ``plan``; returns their ids in plan order."""
        now = utcnow()
        rows = [
            {
                "user_id": user_id,
                "migration_id": step.migration.id,
                "version": step.migration.version,
                "direction": step.direction,
                "status": "pending",
                "attempts": 0,
                "run_id": run_id,
                "created_at": now,
            }
            for step in plan.steps
        ]
        with single(self.engine, "record the plan") as conn:
            result = conn.execute(
                ledger.insert().returning(ledger.c.id, sort_by_parameter_order=True), rows
            )
            return [int(row_id) for row_id in result.scalars()]

    def record_started(self, row_id: int) -> int:
        """Mark a ``pending`` row ``running`` and number the attempt; returns that number."""
        with single(self.engine, "record the start") as conn:
            attempt = conn.execute(_start(row_id, utcnow())).scalar()
        if attempt is None:
            raise ControlPlaneError(f"ledger row {row_id} was not pending: cannot start it")
        return int(attempt)

    def record_completed(
        self,
        row_id: int,
        user_id: int,
        version_after: int,
        *,
        start_next: int | None = None,
        release_owner: str | None = None,
    ) -> int | None:
        """Atomically: the row ``completed`` and the config at ``version_after``.

        ``start_next`` also marks that row ``running`` (returns its attempt number);
        ``release_owner`` also gives back the lease that owner holds.
        """
        now = utcnow()
        config_values: dict[str, object] = {
            "schema_version": version_after,
            "connection_status": "connected",
            "last_error": None,
            "updated_at": now,
        }
        if release_owner is not None:
            config_values["lease_owner"] = sa.case(
                (configs.c.lease_owner == release_owner, None), else_=configs.c.lease_owner
            )
            config_values["lease_expires_at"] = sa.case(
                (configs.c.lease_owner == release_owner, None), else_=configs.c.lease_expires_at
            )
        done = (
            ledger.update()
            .where(ledger.c.id == row_id, ledger.c.status == "running")
            .values(status="completed", completed_at=now, error=None)
        )
        if self._one_statement:
            return self._complete_in_one_statement(done, user_id, config_values, start_next, now)
        with writing(self.engine, "record the success") as conn:
            if conn.execute(done).rowcount != 1:
                raise ControlPlaneError(f"ledger row {row_id} was not running: not recorded")
            conn.execute(
                configs.update().where(configs.c.user_id == user_id).values(**config_values)
            )
            if start_next is None:
                return None
            return _scalar_int(conn.execute(_start(start_next, now)).scalar())

    def _complete_in_one_statement(
        self,
        done: sa.Update,
        user_id: int,
        config_values: dict[str, object],
        start_next: int | None,
        now: datetime,
    ) -> int | None:
        done_cte = done.returning(ledger.c.id).cte("done")
        statement = (
            configs.update()
            .where(configs.c.user_id == user_id, sa.exists(sa.select(done_cte.c.id)))
            .values(**config_values)
        )
        if start_next is not None:
            next_cte = _start(start_next, now).cte("next_step")
            statement = statement.returning(sa.select(next_cte.c.attempts).scalar_subquery())
        else:
            statement = statement.returning(configs.c.user_id)
        with single(self.engine, "record the success") as conn:
            row = conn.execute(statement).first()
        if row is None:
            raise ControlPlaneError("a ledger row was not running: the success was not recorded")
        return None if start_next is None else _scalar_int(row[0])

    def record_failed(self, row_id: int, error: str) -> None:
        """Mark a ``pending`` or ``running`` row ``failed`` with a descriptive error."""
        self._settle([row_id], "failed", error)

    def record_skipped(self, row_ids: list[int], reason: str) -> None:
        """Mark rows that never started ``skipped``, saying why."""
        self._settle(row_ids, "skipped", reason, only=("pending",))

    def settle_orphans(self, user_id: int, applied: set[tuple[str, Direction]]) -> int:
        """Settle rows a dead runner left for this user; call only while holding its lease.

        A ``running`` row whose step the instance's stamp shows done becomes
        ``completed``; any other becomes ``failed`` ("interrupted: runner lost"); leftover
        ``pending`` rows become ``skipped``. Returns how many rows were settled.
        """
        now = utcnow()
        with writing(self.engine, "settle interrupted attempts") as conn:
            orphans = conn.execute(
                sa.select(
                    ledger.c.id, ledger.c.migration_id, ledger.c.direction, ledger.c.status
                ).where(ledger.c.user_id == user_id, ledger.c.status.in_(("pending", "running")))
            ).all()
            for row in orphans:
                if row.status == "pending":
                    status, error = "skipped", "not started: the runner was lost"
                elif (row.migration_id, row.direction) in applied:
                    status, error = "completed", "recovered: the instance's stamp shows it done"
                else:
                    status, error = "failed", "interrupted: runner lost"
                conn.execute(
                    ledger.update()
                    .where(ledger.c.id == row.id, ledger.c.status == row.status)
                    .values(status=status, error=error, completed_at=now)
                )
        return len(orphans)

    def _settle(
        self,
        row_ids: list[int],
        status: str,
        error: str,
        only: tuple[str, ...] = ("pending", "running"),
    ) -> None:
        if not row_ids:
            return
        with single(self.engine, f"record {status}") as conn:
            conn.execute(
                ledger.update()
                .where(ledger.c.id.in_(row_ids), ledger.c.status.in_(only))
                .values(status=status, error=error[:_ERROR_LIMIT], completed_at=utcnow())
            )


def _start(row_id: int, now: datetime) -> sa.Update:
    """UPDATE a pending row to running, numbering the attempt; RETURNING the number."""
    earlier = ledger.alias("earlier")
    mine = ledger.alias("mine")
    attempts = (
        sa.select(sa.func.count())
        .select_from(earlier)
        .join(mine, mine.c.id == row_id)
        .where(
            earlier.c.user_id == mine.c.user_id,
            earlier.c.migration_id == mine.c.migration_id,
            earlier.c.direction == mine.c.direction,
            earlier.c.status.in_(("running", "completed", "failed")),
        )
        .scalar_subquery()
    )
    return (
        ledger.update()
        .where(ledger.c.id == row_id, ledger.c.status == "pending")
        .values(status="running", started_at=now, attempts=attempts + 1)
        .returning(ledger.c.attempts)
    )


def _scalar_int(value: object) -> int | None:
    return None if value is None else int(str(value))
