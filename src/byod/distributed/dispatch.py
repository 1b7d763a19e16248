"""A distributed run's bookkeeping in the control plane: handing users out, claiming one,
recording its end, halting and closing the run.

Everything here is one short control-plane statement or transaction, so any process on
any machine can do its part: the one that starts the run, every worker, every watcher.
The per-run cap on tasks in flight is kept by handing users out in keyset pages only as
tasks finish (:meth:`Dispatcher.top_up`), never all at once. A ``byod_run_tasks`` row per
handed-out user makes a redelivered or duplicated task a no-op and its count exact.
PostgreSQL only: workers on many machines cannot share a SQLite file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from byod._step import OUTCOMES, Settled
from byod.clock import utcnow
from byod.controlplane._tx import reading, single, writing
from byod.controlplane.queries import outdated_query
from byod.controlplane.schema import configs, run_tasks, runs
from byod.errors import ByodError, ControlPlaneError, InputError, SettingsError
from byod.registry import Registry
from byod.settings import safe_url

__all__ = [
    "Claim",
    "Dispatcher",
    "Publisher",
    "TaskMessage",
    "registry_digest",
    "require_server_control_plane",
]

log = logging.getLogger("byod.distributed")


@dataclass(frozen=True)
class TaskMessage:
    """One user of one run, to be sent to the workers consuming ``queue`` (None: default)."""

    run_id: str
    user_id: int
    queue: str | None


#: Sends task messages to the broker (the Celery adapter supplies it).
Publisher = Callable[[Sequence[TaskMessage]], None]


def require_server_control_plane(engine: sa.Engine) -> None:
    """Refuse a control plane that workers on other machines cannot share."""
    if engine.dialect.name != "postgresql":
        raise SettingsError(
            f"distributed runs need a PostgreSQL control plane, not {engine.dialect.name} "
            f"({safe_url(engine.url)}): workers on other machines cannot share it",
            hint="Set BYOD_DATABASE_URL to a PostgreSQL database every worker can reach, "
            "run `byod init`, or run without a broker (drop BYOD_BROKER_URL / --distributed).",
        )


def registry_digest(registry: Registry) -> str:
    """A short fingerprint of the migrations (ids and checksums): a worker whose folder
    differs from the run's must not run its users."""
    text = "\n".join(f"{m.id}:{m.checksum}" for m in registry)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Claim:
    """What a worker learns when it takes a task: the run, the user, and whether to go."""

    run_state: str
    options: dict[str, Any]
    target_version: int
    clerk_id: str
    task_state: str  # before this claim: queued | running | done
    claimed: bool  # True: run the user; False: the run stopped, or the task is done


# Take the task unless it is done or its run has stopped, and say what was there before.
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

# Record the task's end once (a duplicate finds it done) and count it in the same statement.
_FINISH = sa.text(
    """
    WITH done AS (
        UPDATE byod_run_tasks
        SET state = 'done', outcome = :outcome, to_version = :to_version, error = :error,
            error_type = :error_type, steps = :steps, tries = :tries, seconds = :seconds,
            finished_at = timezone('UTC', clock_timestamp())
        WHERE run_id = :run AND user_id = :user AND state <> 'done'
        RETURNING run_id
    )
    UPDATE byod_runs
    SET in_flight = in_flight - 1, total = total + 1 - :n_not_eligible,
        succeeded = succeeded + :n_succeeded, failed = failed + :n_failed,
        busy = busy + :n_busy, up_to_date = up_to_date + :n_up_to_date,
        not_started = not_started + :n_not_started,
        not_eligible = not_eligible + :n_not_eligible,
        updated_at = :now
    WHERE id IN (SELECT run_id FROM done)
    RETURNING state, options, in_flight, dispatched, exhausted, succeeded, failed
    """
)


class Dispatcher:
    """Hands a distributed run's users to the task queue and keeps its books."""

    def __init__(self, engine: sa.Engine, publish: Publisher) -> None:
        require_server_control_plane(engine)
        self.engine = engine
        self.publish = publish

    # -- handing out ---------------------------------------------------------------------

    def top_up(self, run_id: str) -> int:
        """Hand out the run's next users while it is under its cap on tasks in flight;
        halt it when a canary failed or failures pass the ratio; close it when nothing is
        left. Returns how many tasks were sent. Safe to call from anywhere, any time: one
        caller at a time does the work, the others return at once."""
        with writing(self.engine, "hand out the run's next users") as conn:
            row = conn.execute(
                sa.select(runs).where(runs.c.id == run_id).with_for_update(skip_locked=True)
            ).first()
            if row is None or row.ended_at is not None:
                return 0
            options = json.loads(row.options)
            values: dict[str, Any] = {}
            state = row.state
            if state == "running":
                reason = _halt_reason(row, options)
                if reason is not None:
                    log.warning("distributed run %s halted: %s", run_id, reason)
                    state = values["state"] = "halted"
                    values["halt_reason"] = reason
            messages: list[TaskMessage] = []
            exhausted, in_flight = bool(row.exhausted), int(row.in_flight)
            if state == "running" and not exhausted:
                room = _room(row, options)
                if room > 0:
                    page, exhausted = self._hand_out(conn, row, options, room)
                    messages = [TaskMessage(run_id, int(r.user_id), r.queue) for r in page]
                    in_flight += len(page)
                    values["dispatched"] = row.dispatched + len(page)
                    values["in_flight"] = in_flight
                    values["exhausted"] = exhausted
                    if page:
                        values["cursor_version"] = int(page[-1].schema_version)
                        values["cursor_user"] = int(page[-1].user_id)
            if in_flight == 0 and (exhausted or state != "running"):
                values |= _closing(row, state)
            if values:
                values["updated_at"] = utcnow()
                conn.execute(runs.update().where(runs.c.id == run_id).values(**values))
        if messages:
            self.publish(messages)
        return len(messages)

    def _hand_out(
        self, conn: sa.Connection, row: Any, options: dict[str, Any], room: int
    ) -> tuple[Sequence[Any], bool]:
        """The next page of the run's selection after its cursor, as queued task rows."""
        user_ids = options.get("user_ids")
        query = outdated_query(
            int(row.target_version),
            after=(
                -1 if row.cursor_version is None else int(row.cursor_version),
                -1 if row.cursor_user is None else int(row.cursor_user),
            ),
            limit=room,
            statuses=tuple(options["statuses"]),
            untouched_since=row.started_at,
            only_version=options.get("only_version"),
            user_ids=None if user_ids is None else tuple(user_ids),
        )
        page = conn.execute(query).all()
        limit = options.get("limit")
        exhausted = len(page) < room or (
            limit is not None and row.dispatched + len(page) >= int(limit)
        )
        if not page:
            return page, exhausted
        now = utcnow()
        conn.execute(
            run_tasks.insert(),
            [
                {
                    "run_id": row.id,
                    "user_id": r.user_id,
                    "queue": r.queue,
                    "state": "queued",
                    "from_version": r.schema_version,
                    "queued_at": now,
                }
                for r in page
            ],
        )
        return page, exhausted

    def resend_stale(self, run_id: str, older_than_seconds: float) -> int:
        """Send again the run's tasks that look lost (a broker that lost its messages, a
        publish that failed): queued longer than that, or taken longer ago than that by
        a worker whose lease on the user has lapsed. A duplicate is harmless (it finds
        the task done, or waits for its twin). Returns how many were sent."""
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
        query = (
            sa.select(run_tasks.c.user_id, run_tasks.c.queue)
            .join(configs, configs.c.user_id == run_tasks.c.user_id)
            .where(run_tasks.c.run_id == run_id, lost)
        )
        with reading(self.engine, "find the run's lost tasks") as conn:
            messages = [TaskMessage(run_id, int(r.user_id), r.queue) for r in conn.execute(query)]
        if not messages:
            return 0
        with single(self.engine, "mark the tasks sent again") as conn:
            conn.execute(
                run_tasks.update()
                .where(
                    run_tasks.c.run_id == run_id,
                    run_tasks.c.user_id.in_([m.user_id for m in messages]),
                )
                .values(
                    queued_at=now,
                    started_at=sa.case(
                        (run_tasks.c.state == "running", now), else_=run_tasks.c.started_at
                    ),
                )
            )
        log.warning("run %s: sending %d lost tasks again", run_id, len(messages))
        self.publish(messages)
        return len(messages)

    # -- one task ------------------------------------------------------------------------

    def claim(self, run_id: str, user_id: int, worker: str) -> Claim | None:
        """Take one user's task (None: no such task, e.g. its run was deleted)."""
        params = {"run": run_id, "user": user_id, "worker": worker[:128], "now": utcnow()}
        with single(self.engine, "claim the task") as conn:
            row = conn.execute(_CLAIM, params).first()
        if row is None:
            return None
        return Claim(
            run_state=str(row.state),
            options=json.loads(row.options),
            target_version=int(row.target_version),
            clerk_id=str(row.clerk_id),
            task_state=str(row.task_state),
            claimed=bool(row.claimed),
        )

    def finish(self, run_id: str, settled: Settled) -> bool:
        """Record how one user's task ended and count it, then hand out more users (or
        halt or close the run) when that is due; False when the end was already
        recorded (a duplicate delivery), so nothing is counted twice."""
        result = settled.result
        error = settled.error
        params = {
            "run": run_id,
            "user": settled.user.id,
            "outcome": settled.outcome,
            "to_version": None if result is None else result.to_version,
            "error": None if error is None else error.error,
            "error_type": None
            if result is None or result.error is None
            else type(result.error).__name__,
            "steps": None
            if result is None
            else json.dumps([step.__dict__ for step in result.steps]),
            "tries": settled.tries,
            "seconds": None if result is None else result.seconds,
            "now": utcnow(),
        }
        for outcome in OUTCOMES:
            params[f"n_{outcome}"] = int(settled.outcome == outcome)
        with single(self.engine, "record the task's end") as conn:
            run = conn.execute(_FINISH, params).first()
        if run is None:
            return False
        if _top_up_due(run):
            try:
                self.top_up(run_id)
            except ControlPlaneError:
                raise  # the caller tries again later; its task then finds itself done
            except ByodError as exc:  # the end is recorded; a watcher sends them later
                log.warning("run %s: cannot hand out more users now: %s", run_id, exc.message)
        return True

    # -- the whole run -------------------------------------------------------------------

    def stop(self, run_id: str, state: str, reason: str) -> bool:
        """End a running run early (``interrupted`` or ``halted``): nothing more is handed
        out, queued tasks are discarded by the workers, running ones finish. False when
        the run was not running."""
        if state not in ("interrupted", "halted"):
            raise InputError(f"a run can be stopped as interrupted or halted, not {state}")
        with single(self.engine, "stop the run") as conn:
            stopped = conn.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.state == "running")
                .values(state=state, halt_reason=reason, updated_at=utcnow())
            ).rowcount
        self.top_up(run_id)  # closes it at once when nothing is in flight
        return stopped == 1


def _top_up_due(run: Any) -> bool:
    """Whether a run, just after one of its tasks ended, needs a top-up: room for a
    batch of users, a halt to make, or an end to record."""
    if run.in_flight == 0:
        return True
    options = json.loads(run.options)
    if run.state == "running" and _halt_reason(run, options) is not None:
        return True
    return run.state == "running" and not run.exhausted and _room(run, options) > 0


def _room(row: Any, options: dict[str, Any]) -> int:
    """How many users to hand out now."""
    cap = int(options["concurrency"])
    in_flight, dispatched = int(row.in_flight), int(row.dispatched)
    room = cap - in_flight
    canary = int(options.get("canary") or 0)
    if canary and dispatched < canary:
        return min(room, canary - dispatched)
    if canary and dispatched == canary and in_flight:
        return 0  # the canary wave must end before the rest starts
    limit = options.get("limit")
    if limit is not None:
        room = min(room, int(limit) - dispatched)
    # refill in batches: a top-up is a transaction and a page query
    if in_flight and room < max(1, cap // 4):
        return 0
    return max(0, room)


def _halt_reason(row: Any, options: dict[str, Any]) -> str | None:
    failed, done = int(row.failed), int(row.succeeded) + int(row.failed)
    canary = int(options.get("canary") or 0)
    dispatched = int(row.dispatched)
    canary_over = dispatched == canary or (row.exhausted and dispatched < canary)
    if canary and failed and canary_over and not row.in_flight:
        return f"a canary failed ({failed} of {dispatched})"
    ratio = options.get("max_failure_ratio")
    if ratio is not None and done and failed / done > float(ratio):
        return f"{failed} of {done} failed, above --max-failure-ratio {ratio}"
    return None


def _closing(row: Any, state: str) -> dict[str, Any]:
    """The run's last write: its end state; a stopped run's users never handed out are
    counted not started."""
    values: dict[str, Any] = {"ended_at": utcnow()}
    if state == "running":
        values["state"] = "completed"
    else:
        never = max(0, int(row.planned or 0) - int(row.total))
        values["not_started"] = int(row.not_started) + never
        values["total"] = int(row.total) + never
    return values
