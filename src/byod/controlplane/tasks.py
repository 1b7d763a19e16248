"""A distributed run's tasks taken and ended by its workers (PostgreSQL).

A task is one user of one run, ``queued`` -> ``running`` (taken by a worker) -> ``done``
(its outcome recorded). Workers take and end tasks a page at a time (one statement
each way, whatever the page's size); a task's end is recorded and counted on its run in
the same statement, only while it is not ``done``: a duplicate delivery can never count
a user twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa

from byod.clock import utcnow
from byod.controlplane._pages import as_json
from byod.controlplane._tx import reading, single
from byod.controlplane.run_records import Claim, DispatchRow, FinishedTask, TaskEnd
from byod.controlplane.runs import DISPATCH_COLUMNS, dispatch_row
from byod.controlplane.schema import configs, run_tasks, runs, users
from byod.redact import mask
from byod.spec import OUTCOMES, RunSpec

__all__ = ["TaskStore"]

_CLAIM = sa.text(
    """
    WITH claimed AS (
        UPDATE byod_run_tasks AS t
        SET state = 'running', worker = :worker, started_at = :now,
            deliveries = t.deliveries + 1
        FROM byod_runs AS r
        WHERE t.run_id = :run AND t.user_id = :user AND t.state <> 'done'
          AND r.id = t.run_id AND r.state = 'running'
        RETURNING t.user_id
    )
    SELECT r.state, r.options, r.target_version, u.clerk_id, t.state AS task_state,
           EXISTS (SELECT 1 FROM claimed) AS claimed
    FROM byod_runs AS r
    JOIN byod_run_tasks AS t ON t.run_id = r.id AND t.user_id = :user
    JOIN users AS u ON u.id = t.user_id
    WHERE r.id = :run
    """
)

_COUNTED = ", ".join(f"{name} = {name} + :n_{name}" for name in OUTCOMES)

# Record the task's end once (a duplicate finds it done) and count it in the same statement.
_FINISH = sa.text(
    f"""
    WITH done AS (
        UPDATE byod_run_tasks
        SET state = 'done', outcome = :outcome, to_version = :to_version, error = :error,
            error_type = :error_type, steps = :steps, tries = :tries, seconds = :seconds,
            finished_at = timezone('UTC', clock_timestamp())
        WHERE run_id = :run AND user_id = :user AND state <> 'done'
        RETURNING run_id
    )
    UPDATE byod_runs
    SET in_flight = in_flight - 1, total = total + 1 - :n_not_eligible, {_COUNTED},
        updated_at = :now
    WHERE id IN (SELECT run_id FROM done)
    RETURNING {DISPATCH_COLUMNS}
    """
)


# A page of tasks taken at once: each one not done yet is marked running by this worker;
# every task of the page is returned, with whether this claim took it.
_CLAIM_PAGE = sa.text(
    """
    WITH claimed AS (
        UPDATE byod_run_tasks AS t
        SET state = 'running', worker = :worker, started_at = :now,
            deliveries = t.deliveries + 1
        FROM byod_runs AS r
        WHERE t.run_id = :run AND t.user_id = ANY(CAST(:users AS integer[]))
          AND t.state <> 'done' AND r.id = t.run_id AND r.state = 'running'
        RETURNING t.user_id
    )
    SELECT r.state, r.options, r.target_version, t.user_id, u.clerk_id,
           t.state AS task_state, t.user_id IN (SELECT user_id FROM claimed) AS claimed
    FROM byod_runs AS r
    JOIN byod_run_tasks AS t ON t.run_id = r.id
    JOIN users AS u ON u.id = t.user_id
    WHERE r.id = :run AND t.user_id = ANY(CAST(:users AS integer[]))
    """
)

_PAGE_COUNTED = ", ".join(f"{name} = {name} + c.n_{name}" for name in OUTCOMES)
_PAGE_COUNTS = ", ".join(
    f"count(*) FILTER (WHERE outcome = '{name}') AS n_{name}" for name in OUTCOMES
)

# A page of task ends recorded and counted on their run in one statement; an end
# already recorded (a duplicate) is neither written again nor counted.
_FINISH_PAGE = sa.text(
    f"""
    WITH done AS (
        UPDATE byod_run_tasks AS t
        SET state = 'done', outcome = e.outcome, to_version = e.to_version,
            error = e.error, error_type = e.error_type, steps = e.steps, tries = e.tries,
            seconds = e.seconds, finished_at = timezone('UTC', clock_timestamp())
        FROM json_to_recordset(CAST(:ends AS json))
             AS e(user_id integer, outcome text, to_version integer, error text,
                  error_type text, steps text, tries integer, seconds double precision)
        WHERE t.run_id = :run AND t.user_id = e.user_id AND t.state <> 'done'
        RETURNING t.outcome
    ), c AS (
        SELECT count(*) AS n, {_PAGE_COUNTS} FROM done
    )
    UPDATE byod_runs
    SET in_flight = in_flight - c.n, total = total + c.n - c.n_not_eligible,
        {_PAGE_COUNTED}, updated_at = :now
    FROM c
    WHERE id = :run AND c.n > 0
    RETURNING {DISPATCH_COLUMNS}
    """
)


class TaskStore:
    """Claims and ends a distributed run's tasks (PostgreSQL: one statement each)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def claim(self, run_id: str, user_id: int, worker: str) -> Claim | None:
        """Take one user's task (None: no such task, e.g. its run was deleted)."""
        params = {"run": run_id, "user": user_id, "worker": worker[:128], "now": utcnow()}
        with single(self.engine, "claim the task") as conn:
            row = conn.execute(_CLAIM, params).first()
        if row is None:
            return None
        return Claim(
            run_state=str(row.state),
            spec=RunSpec.from_json(str(row.options)),
            target_version=int(row.target_version),
            clerk_id=str(row.clerk_id),
            task_state=str(row.task_state),
            claimed=bool(row.claimed),
        )

    def finish(self, run_id: str, user_id: int, end: TaskEnd) -> DispatchRow | None:
        """Record how the task ended and count it on its run; returns the run as it now
        is, or None when the end was already recorded (a duplicate: nothing counted)."""
        params: dict[str, object] = {"run": run_id, "user": user_id, "now": utcnow()}
        params |= end.__dict__
        params["error"] = None if end.error is None else mask(end.error)
        params |= {f"n_{name}": int(end.outcome == name) for name in OUTCOMES}
        with single(self.engine, "record the task's end") as conn:
            row = conn.execute(_FINISH, params).first()
        return None if row is None else dispatch_row(row)

    def claim_page(self, run_id: str, user_ids: Sequence[int], worker: str) -> dict[int, Claim]:
        """Take a page of a run's tasks in one statement; each user's :class:`Claim`
        (a user without a task in the run, e.g. its run was deleted, is left out)."""
        params = {"run": run_id, "users": list(user_ids), "worker": worker[:128], "now": utcnow()}
        with single(self.engine, "claim the tasks") as conn:
            rows = conn.execute(_CLAIM_PAGE, params).all()
        specs: dict[str, RunSpec] = {}
        claims: dict[int, Claim] = {}
        for row in rows:
            options = str(row.options)
            spec = specs.get(options) or specs.setdefault(options, RunSpec.from_json(options))
            claims[int(row.user_id)] = Claim(
                run_state=str(row.state),
                spec=spec,
                target_version=int(row.target_version),
                clerk_id=str(row.clerk_id),
                task_state=str(row.task_state),
                claimed=bool(row.claimed),
            )
        return claims

    def finish_page(self, run_id: str, ends: Sequence[tuple[int, TaskEnd]]) -> DispatchRow | None:
        """Record how a page of tasks ended (``(user, end)`` each) and count them on
        their run, in one statement; returns the run as it now is, or None when every
        end was already recorded (duplicates: nothing counted)."""
        if not ends:
            return None
        rows = [
            {
                "user_id": user_id,
                "outcome": end.outcome,
                "to_version": end.to_version,
                "error": None if end.error is None else mask(end.error),
                "error_type": end.error_type,
                "steps": end.steps,
                "tries": end.tries,
                "seconds": end.seconds,
            }
            for user_id, end in ends
        ]
        params = {"run": run_id, "now": utcnow(), "ends": as_json(rows)}
        with single(self.engine, "record the tasks' ends") as conn:
            row = conn.execute(_FINISH_PAGE, params).first()
        return None if row is None else dispatch_row(row)

    def send_again(
        self,
        run_id: str,
        older_than_seconds: float,
        lapsed_seconds: float | None = None,
        stalled_seconds: float | None = None,
    ) -> list[tuple[int, str | None]]:
        """The run's tasks that look lost, marked sent again now; returns them (user,
        queue) for the caller to publish. Lost: queued longer than ``older_than_seconds``
        (a broker lost the message), or taken that long ago by a worker whose lease on
        the user has lapsed; and, given ``lapsed_seconds`` (the run's lease), at once
        when a worker of this run took the user's lease and let it lapse (it died) and
        the task was not sent again within that long; and, given ``stalled_seconds``,
        queued that long while no task of the run has ended for that long (a worker that
        died holding messages it had taken from the queue but not begun: Redis gives
        them back only after its visibility timeout). Tasks merely waiting in a queue of
        a run that moves are never sent early; a duplicate finds its task done, or waits
        for its twin."""
        now = utcnow()
        cutoff = now - timedelta(seconds=older_than_seconds)
        lost = sa.or_(
            sa.and_(run_tasks.c.state == "queued", run_tasks.c.queued_at < cutoff),
            sa.and_(
                run_tasks.c.state == "running",
                run_tasks.c.started_at < cutoff,
                sa.or_(configs.c.lease_owner.is_(None), configs.c.lease_expires_at < now),
            ),
        )
        if lapsed_seconds is not None:
            lapsed = sa.and_(
                run_tasks.c.state == "running",
                configs.c.lease_owner.startswith(f"{run_id}:", autoescape=True),
                configs.c.lease_expires_at < now,
                run_tasks.c.queued_at < now - timedelta(seconds=lapsed_seconds),
            )
            lost = sa.or_(lost, lapsed)
        if stalled_seconds is not None:
            quiet = now - timedelta(seconds=stalled_seconds)
            stalled = sa.and_(
                run_tasks.c.state == "queued",
                run_tasks.c.queued_at < quiet,
                runs.c.updated_at < quiet,
            )
            lost = sa.or_(lost, stalled)
        query = (
            sa.select(run_tasks.c.user_id, run_tasks.c.queue)
            .join(configs, configs.c.user_id == run_tasks.c.user_id)
            .join(runs, runs.c.id == run_tasks.c.run_id)
            .where(run_tasks.c.run_id == run_id, lost)
        )
        with reading(self.engine, "find the run's lost tasks") as conn:
            found = [(int(r.user_id), r.queue) for r in conn.execute(query)]
        if not found:
            return []
        with single(self.engine, "mark the tasks sent again") as conn:
            conn.execute(
                run_tasks.update()
                .where(
                    run_tasks.c.run_id == run_id,
                    run_tasks.c.user_id.in_([user_id for user_id, _ in found]),
                )
                .values(
                    queued_at=now,
                    started_at=sa.case(
                        (run_tasks.c.state == "running", now), else_=run_tasks.c.started_at
                    ),
                )
            )
        return found

    def finished(self, run_id: str, since: datetime | None) -> list[FinishedTask]:
        """The run's tasks recorded done (since that moment, when given), oldest first."""
        query = (
            sa.select(run_tasks, users.c.clerk_id)
            .join(users, users.c.id == run_tasks.c.user_id)
            .where(run_tasks.c.run_id == run_id, run_tasks.c.state == "done")
            .order_by(run_tasks.c.finished_at)
        )
        if since is not None:
            query = query.where(run_tasks.c.finished_at >= since)
        with reading(self.engine, "read the run's finished tasks") as conn:
            return [
                FinishedTask(
                    user_id=int(r.user_id),
                    clerk_id=str(r.clerk_id),
                    outcome=str(r.outcome),
                    tries=int(r.tries),
                    from_version=int(r.from_version),
                    to_version=None if r.to_version is None else int(r.to_version),
                    error=r.error,
                    error_type=r.error_type,
                    steps=str(r.steps or "[]"),
                    seconds=float(r.seconds or 0.0),
                    finished_at=r.finished_at,
                )
                for r in conn.execute(query)
            ]

    def failed(self, run_id: str, limit: int) -> list[FinishedTask]:
        """The run's tasks that ended ``failed``, oldest first."""
        return [t for t in self.finished(run_id, None) if t.outcome == "failed"][:limit]
