"""The ledger: the control plane's record of every migration attempt for every user; this
module is the one writer of ``byod_migrations``.

One row per planned step of one run; rows are never overwritten by a later run, so a
user's history keeps every earlier attempt. What each status means:

* ``pending``   planned by a run, not started yet.
* ``running``   started; the instance transaction may be open (a fleet run writes its
                users' first steps ``running`` with their page, just before it starts
                them). Only a runner that holds the user's lease has ``running`` rows; a
                dead runner's rows are settled by the next run (``completed`` if the
                instance's stamp has the step, ``failed`` "interrupted: runner lost"
                otherwise).
* ``completed`` done on the instance (its stamp written in the same transaction) and
                recorded here together with the config's ``schema_version``.
* ``failed``    the attempt failed; its instance changes were rolled back. A ``failed``
                row with ``attempts`` 0 and no ``started_at`` is a failure before the
                chain started (the instance unreachable, credentials that do not open,
                drift, a dirty instance, the timeout spent connecting): it names the step
                the control plane expected to run next, and its error starts with the
                error class (``UnreachableError: ...``).
* ``skipped``   planned but never started: an earlier step failed or the run stopped.

A user another runner was working on (``busy``) gets no row: that runner writes them.

``attempts`` on a row is the attempt number of that step for that user and direction
(1 for the first time it ran; 0 when it never started).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.sql.dml import ReturningInsert

from byod.clock import utcnow
from byod.controlplane._pages import (
    PG_COMPLETE_CONFIGS,
    PG_COMPLETE_ROWS,
    PG_INSERT_PLANS,
    PageCounts,
    among,
    as_json,
    page_counts,
    plan_rows,
)
from byod.controlplane._tx import reading, single, writing
from byod.controlplane.directory import config_at_version
from byod.controlplane.schema import configs, ledger
from byod.errors import ControlPlaneError
from byod.redact import mask
from byod.registry import Direction, Migration, Plan, Step

__all__ = ["CompletedStep", "Ledger", "LedgerRow", "PageCounts", "SettledRow"]

_ERROR_LIMIT = 2000


def _kept(error: str) -> str:
    """An error as the ledger keeps it: secrets masked, cut to the column's size."""
    return mask(error)[:_ERROR_LIMIT]


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
    #: a phased step's rows done by its backfills, and their estimated total
    rows_done: int | None = None
    rows_total: int | None = None
    #: how its backfills' page sizes went when a page hit a transaction limit
    page_sizes: str | None = None


class Ledger:
    """Writes ``byod_migrations``; a step's "completed" row also runs the directory's
    :func:`~byod.controlplane.directory.config_at_version` in the same statement.

    Rows are addressed by (user, migration, direction) and status: while a runner holds
    the user's lease, at most one row per step is open. Every write is one statement in
    autocommit where it can be, so a user's chain costs "planned" (which also starts the
    first step), then one "completed" per step (which also starts the next step, and on
    the last step gives the lease back). On PostgreSQL "completed" is one
    statement (data-modifying CTEs); elsewhere one short transaction.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._one_statement = engine.dialect.name == "postgresql"

    def record_planned(self, user_id: int, plan: Plan, run_id: str | None) -> int:
        """Write one row per step of ``plan``: the first ``running`` with its attempt
        number, the rest ``pending`` (one statement); returns the first's attempt."""
        now = utcnow()
        params: dict[str, object] = {"user_id": user_id, "run_id": run_id, "now": now}
        for index, step in enumerate(plan.steps):
            params |= {
                f"m{index}": step.migration.id,
                f"v{index}": step.migration.version,
                f"d{index}": step.direction,
            }
        with single(self.engine, "record the plan") as conn:
            written = conn.execute(_planned(len(plan.steps)), params).all()
        return next(int(attempts) for status, attempts in written if status == "running")

    def record_completed(
        self,
        user_id: int,
        step: Step,
        *,
        start_next: Step | None = None,
        release_owner: str | None = None,
        started_at: datetime | None = None,
    ) -> int | None:
        """Atomically: the step's row ``completed`` and the config at its version after.

        ``start_next`` also marks that step's row ``running`` (returns its attempt
        number); ``release_owner`` also gives back the lease that owner holds;
        ``started_at``: when the step began on the instance (kept as the row's).
        """
        now = utcnow()
        params = _step_params(user_id, step, now) | {
            "b_version": step.version_after,
            "b_owner": release_owner,
            "b_started": started_at,
        }
        if start_next is not None:
            params |= {"b_next_m": start_next.migration.id, "b_next_d": start_next.direction}
        release = release_owner is not None
        if self._one_statement:
            with single(self.engine, "record the success") as conn:
                row = conn.execute(_completion(start_next is not None, release), params).first()
            if row is None:
                raise ControlPlaneError(
                    f"user {user_id}: {step.migration.id} was not running: not recorded"
                )
            return None if start_next is None else _scalar_int(row[0])
        with writing(self.engine, "record the success") as conn:
            if conn.execute(_DONE, params).rowcount != 1:
                raise ControlPlaneError(
                    f"user {user_id}: {step.migration.id} was not running: not recorded"
                )
            conn.execute(config_at_version(release), params)
            if start_next is None:
                return None
            next_params = _step_params(user_id, start_next, now)
            return _scalar_int(conn.execute(_start(), next_params).scalar())

    def page_counts(self, user_ids: Sequence[int]) -> PageCounts:
        """For a page of users (their leases held): the rows a lost runner left open,
        and the attempts each step had before (one statement)."""
        if not user_ids:
            return PageCounts({}, {})
        with reading(self.engine, "read the page's ledger") as conn:
            return page_counts(conn, user_ids)

    def record_planned_page(
        self, plans: dict[int, Plan], counts: PageCounts, run_id: str | None
    ) -> dict[int, int]:
        """:meth:`record_planned` for a page of users (their leases held, none with open
        rows) in one statement, before any of their instances is touched; returns each
        user's first attempt number."""
        now = utcnow()
        rows, attempts = plan_rows(plans.items(), counts.tries, run_id, now)
        if not rows:
            return attempts
        with single(self.engine, "record the page's plans") as conn:
            if not self._one_statement:
                conn.execute(ledger.insert(), rows)
                return attempts
            conn.execute(PG_INSERT_PLANS, {"rows": as_json(rows), "run_id": run_id, "now": now})
        return attempts

    def drop_planned(self, user_ids: Sequence[int], run_id: str | None) -> None:
        """Forget the rows this run planned for users it then never started (a page's
        users left when the run stopped, a user refused or found at another version
        before its chain began): one statement. Only rows still ``pending`` or
        ``running`` of this run go; nothing ran for them."""
        if not user_ids:
            return
        with single(self.engine, "forget the unstarted plans") as conn:
            conn.execute(
                ledger.delete().where(
                    among(ledger.c.user_id, user_ids, self.engine.dialect),
                    ledger.c.run_id == run_id if run_id is not None else ledger.c.run_id.is_(None),
                    ledger.c.status.in_(("pending", "running")),
                )
            )

    def record_last_steps(self, done: Sequence[CompletedStep]) -> int:
        """:meth:`record_completed` of the last step of many users at once (each giving
        its lease back), in one transaction; returns how many ledger rows it completed
        (a row no longer ``running``, settled by another runner that took the lease, is
        left as it is)."""
        if not done:
            return 0
        if self._one_statement:  # PostgreSQL: set-based, two statements whatever the size
            batch = {
                "rows": as_json(
                    [
                        {
                            "user_id": one.user_id,
                            "migration_id": one.step.migration.id,
                            "direction": one.step.direction,
                            "version": one.step.version_after,
                            "started_at": one.started_at,
                            "completed_at": one.completed_at,
                            "owner": one.owner,
                        }
                        for one in done
                    ]
                )
            }
            with writing(self.engine, "record the successes") as conn:
                completed = conn.execute(PG_COMPLETE_ROWS, batch).rowcount
                conn.execute(PG_COMPLETE_CONFIGS, batch)
            return completed
        params = [
            _step_params(one.user_id, one.step, one.completed_at)
            | {"b_version": one.step.version_after, "b_owner": one.owner}
            | {"b_started": one.started_at}
            for one in done
        ]
        with writing(self.engine, "record the successes") as conn:
            completed = conn.execute(_DONE, params).rowcount
            conn.execute(config_at_version(True), params)
        return completed

    def record_rows(
        self, user_id: int, step: Step, rows_done: int, rows_total: int | None = None
    ) -> None:
        """How many rows a running phased step's backfills have done so far (and, when
        known, the estimated total)."""
        params = _step_params(user_id, step, utcnow())
        params |= {"b_rows": rows_done, "b_total": rows_total}
        with single(self.engine, "record the rows done") as conn:
            conn.execute(_ROWS, params)

    def record_page_sizes(self, user_id: int, step: Step, summary: str) -> None:
        """How a running phased step's page sizes went (a page hit a transaction limit)."""
        params = _step_params(user_id, step, utcnow()) | {"b_pages": summary}
        with single(self.engine, "record the page sizes") as conn:
            conn.execute(_PAGES, params)

    def record_failed(self, user_id: int, step: Step, error: str) -> None:
        """Mark the step's ``running`` row ``failed`` with a descriptive error."""
        params = _step_params(user_id, step, utcnow()) | {"b_error": _kept(error)}
        with single(self.engine, "record the failure") as conn:
            conn.execute(_FAILED, params)

    def record_not_started(self, user_id: int, step: Step, error: str, run_id: str | None) -> None:
        """A failure before the chain started: one ``failed`` row for ``step`` (the one
        the control plane expected to run next), attempts 0, never started. A fleet
        run's retries of the user update its row rather than add one each. Call only
        while holding the user's lease."""
        now = utcnow()
        if run_id is not None:
            with single(self.engine, "record the failure") as conn:
                updated = conn.execute(
                    ledger.update()
                    .where(
                        *_THIS_STEP,
                        ledger.c.run_id == run_id,
                        ledger.c.status == "failed",
                        ledger.c.started_at.is_(None),
                    )
                    .values(error=_kept(error), completed_at=now),
                    _step_params(user_id, step, now),
                ).rowcount
            if updated:
                return
        row = {
            "user_id": user_id,
            "migration_id": step.migration.id,
            "version": step.migration.version,
            "direction": step.direction,
            "status": "failed",
            "error": _kept(error),
            "attempts": 0,
            "run_id": run_id,
            "completed_at": now,
            "created_at": now,
        }
        with single(self.engine, "record the failure") as conn:
            conn.execute(ledger.insert().values(row))

    def record_adopted(self, user_id: int, migration: Migration, note: str) -> None:
        """Atomically: one ``completed`` row for ``migration`` (attempts 0, never started:
        nothing ran) whose error column holds ``note`` (what was adopted, by whom), and the
        config at its version: an instance Alembic brought there, now byod's."""
        now = utcnow()
        row = {
            "user_id": user_id,
            "migration_id": migration.id,
            "version": migration.version,
            "direction": "up",
            "status": "completed",
            "error": _kept(note),
            "attempts": 0,
            "completed_at": now,
            "created_at": now,
        }
        moved = {"b_version": migration.version, "b_now": now, "b_user": user_id}
        with writing(self.engine, "record the adoption") as conn:
            conn.execute(ledger.insert().values(row))
            conn.execute(config_at_version(False), moved)

    def record_skipped(self, user_id: int, steps: tuple[Step, ...], reason: str) -> None:
        """Mark the ``pending`` rows of steps that never started ``skipped``, saying why."""
        if not steps:
            return
        with single(self.engine, "record skipped steps") as conn:
            conn.execute(
                ledger.update()
                .where(
                    ledger.c.user_id == user_id,
                    ledger.c.status == "pending",
                    sa.tuple_(ledger.c.migration_id, ledger.c.direction).in_(
                        [(s.migration.id, s.direction) for s in steps]
                    ),
                )
                .values(status="skipped", error=_kept(reason), completed_at=utcnow())
            )

    def moved_in_run(self, user_id: int, run_id: str) -> bool:
        """Whether the run completed at least one step for this user."""
        query = sa.select(ledger.c.id).where(
            ledger.c.user_id == user_id,
            ledger.c.run_id == run_id,
            ledger.c.status == "completed",
        )
        with reading(self.engine, "read what the run did") as conn:
            return conn.execute(query.limit(1)).first() is not None

    def settle_orphans(self, user_id: int, applied: set[tuple[str, Direction]]) -> list[SettledRow]:
        """Settle rows a dead runner left for this user; call only while holding its lease.

        A ``running`` row whose step the instance's stamp shows done becomes
        ``completed``; any other becomes ``failed`` ("interrupted: runner lost"); leftover
        ``pending`` rows become ``skipped``. Returns the rows settled, as they now are.
        """
        now = utcnow()
        settled: list[SettledRow] = []
        with writing(self.engine, "settle interrupted attempts") as conn:
            orphans = conn.execute(
                sa.select(
                    ledger.c.id,
                    ledger.c.migration_id,
                    ledger.c.direction,
                    ledger.c.status,
                    ledger.c.run_id,
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
                settled.append(SettledRow(row.migration_id, row.direction, status, row.run_id))
        return settled


@dataclass(frozen=True)
class CompletedStep:
    """A user's last step, done on its instance, waiting to be recorded with others."""

    user_id: int
    step: Step
    #: the lease owner that gives the user's lease back with the record
    owner: str
    started_at: datetime
    completed_at: datetime


@dataclass(frozen=True)
class SettledRow:
    """A row a lost runner left open, as :meth:`Ledger.settle_orphans` settled it."""

    migration_id: str
    direction: str
    status: str
    run_id: str | None


# Statements are built once, with bound parameters: building SQLAlchemy constructs on
# every call costs more than running them.
_u: sa.BindParameter[int] = sa.bindparam("b_user", type_=sa.Integer)
_m: sa.BindParameter[str] = sa.bindparam("b_migration", type_=sa.String)
_d: sa.BindParameter[str] = sa.bindparam("b_direction", type_=sa.String)
_now: sa.BindParameter[datetime] = sa.bindparam("b_now", type_=sa.DateTime)
_THIS_STEP = (ledger.c.user_id == _u, ledger.c.migration_id == _m, ledger.c.direction == _d)


def _step_params(user_id: int, step: Step, now: datetime) -> dict[str, object]:
    return {
        "b_user": user_id,
        "b_migration": step.migration.id,
        "b_direction": step.direction,
        "b_now": now,
    }


_PLANNED_COLUMNS = (
    "user_id",
    "migration_id",
    "version",
    "direction",
    "status",
    "attempts",
    "run_id",
    "started_at",
    "created_at",
)


@functools.lru_cache(maxsize=64)
def _planned(steps: int) -> ReturningInsert[str, int]:
    """The INSERT of a plan of ``steps`` steps (an ``INSERT … SELECT`` of one row per step,
    every value bound, so SQLAlchemy compiles it once per plan length, not per user; a
    multi-row ``VALUES`` is never cached): the first row ``running`` with its attempt
    number, the rest ``pending``."""
    user = sa.bindparam("user_id", type_=sa.Integer)
    now = sa.bindparam("now", type_=sa.DateTime)
    run_id = sa.bindparam("run_id", type_=sa.String)
    selects = []
    for index in range(steps):
        first = index == 0
        migration = sa.bindparam(f"m{index}", type_=sa.String)
        direction = sa.bindparam(f"d{index}", type_=sa.String)
        attempts = _tries_before(user, migration, direction) + 1 if first else sa.literal(0)
        selects.append(
            sa.select(
                user,
                migration,
                sa.bindparam(f"v{index}", type_=sa.Integer),
                direction,
                sa.literal("running" if first else "pending"),
                attempts,
                run_id,
                now if first else sa.null(),
                now,
            )
        )
    rows = sa.union_all(*selects) if steps > 1 else selects[0]
    return (
        ledger.insert()
        .from_select(_PLANNED_COLUMNS, rows)
        .returning(ledger.c.status, ledger.c.attempts)
    )


def _tries_before(
    user: sa.ColumnElement[int], migration: sa.ColumnElement[str], direction: sa.ColumnElement[str]
) -> sa.ScalarSelect[int]:
    """How many attempts of this step were made before (its next attempt's number - 1)."""
    earlier = ledger.alias("earlier")
    return (
        sa.select(sa.func.count())
        .select_from(earlier)
        .where(
            earlier.c.user_id == user,
            earlier.c.migration_id == migration,
            earlier.c.direction == direction,
            earlier.c.status.in_(("running", "completed", "failed")),
            earlier.c.started_at.is_not(None),  # a failure before the chain is no attempt
        )
        .scalar_subquery()
    )


def _start_statement(
    migration: sa.BindParameter[str], direction: sa.BindParameter[str]
) -> sa.Update:
    """UPDATE a step's pending row to running, numbering the attempt; RETURNING it."""
    attempts = _tries_before(_u, migration, direction)
    return (
        ledger.update()
        .where(
            ledger.c.user_id == _u,
            ledger.c.migration_id == migration,
            ledger.c.direction == direction,
            ledger.c.status == "pending",
        )
        .values(status="running", started_at=_now, attempts=attempts + 1)
        .returning(ledger.c.attempts)
    )


@functools.cache
def _start() -> sa.Update:
    """Start the step the parameters name (built once, on first use)."""
    return _start_statement(_m, _d)


@functools.cache
def _start_next() -> sa.Update:
    """Start the step after it (``b_next_m``, ``b_next_d``), in a completion's statement."""
    return _start_statement(
        sa.bindparam("b_next_m", type_=sa.String), sa.bindparam("b_next_d", type_=sa.String)
    )


_DONE = (
    ledger.update()
    .where(*_THIS_STEP, ledger.c.status == "running")
    .values(
        status="completed",
        completed_at=_now,
        error=None,
        # when the step began on the instance, where the row was written before (its page)
        started_at=sa.func.coalesce(
            sa.bindparam("b_started", type_=sa.DateTime), ledger.c.started_at
        ),
    )
)
_ROWS = (
    ledger.update()
    .where(*_THIS_STEP, ledger.c.status == "running")
    .values(
        rows_done=sa.bindparam("b_rows"),
        rows_total=sa.func.coalesce(
            sa.bindparam("b_total", type_=sa.BigInteger), ledger.c.rows_total
        ),
    )
)
_PAGES = (
    ledger.update()
    .where(*_THIS_STEP, ledger.c.status == "running")
    .values(page_sizes=sa.bindparam("b_pages"))
)
_FAILED = (
    ledger.update()
    .where(*_THIS_STEP, ledger.c.status.in_(("pending", "running")))
    .values(status="failed", error=sa.bindparam("b_error"), completed_at=_now)
)


@functools.cache
def _completion(start_next: bool, release: bool) -> sa.Update:
    """PostgreSQL: the whole success in one statement (data-modifying CTEs)."""
    done = _DONE.returning(ledger.c.id).cte("done")
    statement = config_at_version(release).where(sa.exists(sa.select(done.c.id)))
    if start_next:
        next_step = _start_next().cte("next_step")
        return statement.returning(sa.select(next_step.c.attempts).scalar_subquery())
    return statement.returning(configs.c.user_id)


def _scalar_int(value: object) -> int | None:
    return None if value is None else int(str(value))
