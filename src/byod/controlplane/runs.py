"""Fleet runs: the one writer of ``byod_runs``, and of the ``queued`` rows of
``byod_run_tasks`` a distributed run hands out (:mod:`byod.controlplane.tasks` takes and
ends them).

``byod_runs``: one row per run (who, its specification, state, counts). A run's state
is ``running`` until it ends ``completed``, ``halted`` (a canary or the failure ratio
stopped it) or ``interrupted`` (Ctrl-C, ``runs stop``); ``ended_at`` is set exactly once.
A run whose process died stays ``running`` in the table; readers see it as
``interrupted`` once it has not reported for a while (``run_records.STALE_AFTER``).
"""

from __future__ import annotations

import dataclasses
import getpass
import secrets
import socket
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from byod.clock import utcnow
from byod.controlplane._tx import reading, single, writing
from byod.controlplane.queries import outdated_query
from byod.controlplane.run_records import (
    DispatchRow,
    MovedUser,
    RunRecord,
)
from byod.controlplane.schema import ledger, run_tasks, runs, users
from byod.errors import InputError
from byod.spec import RunCounts, RunSpec
from byod.text import has_control, printable

__all__ = ["DISPATCH_COLUMNS", "RunStore", "dispatch_row"]

_RECORD_COLUMNS = [
    c for c in runs.columns if c.name not in ("cursor_version", "cursor_user", "exhausted")
]


def _record(row: sa.Row[tuple[object, ...]]) -> RunRecord:
    data = row._asdict()
    counts = {name: int(data.pop(name)) for name in RunCounts.__dataclass_fields__}
    counts["up_to_date"] += int(data.pop("skipped"))  # a run recorded by an older byod
    data["spec"] = RunSpec.from_json(str(data.pop("options")))
    return RunRecord(counts=RunCounts(**counts), **data)


def local_user() -> str:
    """Who asked, when nobody says: this process's OS user at its host."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


class RunStore:
    """Writes and reads ``byod_runs``."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def start(
        self,
        kind: str,
        spec: RunSpec,
        *,
        started_by: str | None = None,
        planned: int | None = None,
        counts: RunCounts | None = None,
    ) -> str:
        """Record a new run (``kind``: migrate or rollback) as ``running``; returns its id.
        ``started_by``: who asked for it (an HTTP caller's token subject); default this
        process's OS user@host. ``planned`` and ``counts``: its size and first counts,
        written with it (one statement)."""
        now = utcnow()
        run_id = f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        sized: dict[str, object] = {} if counts is None else dict(counts.__dict__)
        if planned is not None:
            sized["planned"] = planned
        with single(self.engine, "record the run") as conn:
            conn.execute(
                runs.insert().values(
                    **sized,
                    id=run_id,
                    kind=kind,
                    started_by=(started_by or local_user())[:255],
                    options=spec.to_json(),
                    state="running",
                    target_version=spec.to_version,
                    undoes=spec.undoes,
                    started_at=now,
                    updated_at=now,
                )
            )
        return run_id

    def progress(self, run_id: str, counts: RunCounts, *, planned: int | None = None) -> None:
        """Write the counts so far (and that the run is alive); ``planned``: its size."""
        if planned is None:
            self._write(run_id, counts)
        else:
            self._write(run_id, counts, planned=planned)

    def finish(
        self, run_id: str, counts: RunCounts, state: str, halt_reason: str | None = None
    ) -> None:
        """Record how the run ended."""
        self._write(run_id, counts, state=state, halt_reason=halt_reason, ended_at=utcnow())

    def _write(self, run_id: str, counts: RunCounts, **values: object) -> None:
        with single(self.engine, "record the run's progress") as conn:
            conn.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(updated_at=utcnow(), **counts.__dict__, **values)
            )

    def get(self, run_id: str) -> RunRecord:
        """One run; :class:`InputError` when there is none with that id (a malformed
        id, too: it names no run, whatever the database would make of it)."""
        if not run_id or len(run_id) > 64 or has_control(run_id):
            raise InputError(f"no fleet run {printable(run_id)!r} (see `byod runs`)")
        with reading(self.engine, "read the run") as conn:
            row = conn.execute(sa.select(*_RECORD_COLUMNS).where(runs.c.id == run_id)).first()
        if row is None:
            raise InputError(f"no fleet run {run_id!r} (see `byod runs`)")
        return self._counted(_record(row))

    def running(self) -> int:
        """How many runs are under way (state ``running``)."""
        with reading(self.engine, "count the running runs") as conn:
            query = sa.select(sa.func.count()).select_from(runs).where(runs.c.state == "running")
            return int(conn.execute(query).scalar_one())

    def recent(self, limit: int = 20, *, noop: bool = False) -> list[RunRecord]:
        """The newest runs first; ``noop``: runs that moved nobody too (left out by
        default: a re-run with nothing to do is no news)."""
        query = (
            sa.select(*_RECORD_COLUMNS)
            .order_by(runs.c.started_at.desc(), runs.c.id.desc())
            .limit(limit)
        )
        if not noop:
            query = query.where(sa.not_(_NOOP))
        with reading(self.engine, "list runs") as conn:
            records = [_record(row) for row in conn.execute(query)]
        return [self._counted(record) for record in records]

    def _counted(self, record: RunRecord) -> RunRecord:
        """A run whose process died (``interrupted``, by its state or its silence) may
        have settled users in the ledger that it never counted: its counts are made to
        agree with the ledger (never lowered), and its total with its counts."""
        if record.shown_state != "interrupted" or record.kind == "rehearse":
            return record
        with reading(self.engine, "count the run's users in the ledger") as conn:
            row = conn.execute(_LEDGER_OUTCOMES, {"run": record.id}).one()
        failed, succeeded = int(row[0] or 0), int(row[1] or 0)
        c = record.counts
        c = dataclasses.replace(
            c, succeeded=max(c.succeeded, succeeded), failed=max(c.failed, failed)
        )
        total = max(c.total, c.done + c.not_started)
        return dataclasses.replace(record, counts=dataclasses.replace(c, total=total))

    def failures(self, run_id: str, limit: int = 100) -> list[tuple[int, str, str, str | None]]:
        """(user id, clerk id, migration, error) of the run's failed users, each by its
        last failure (a retry that succeeded is no failure), oldest first."""
        last = _last_rows()
        query = (
            sa.select(users.c.id, users.c.clerk_id, ledger.c.migration_id, ledger.c.error)
            .select_from(ledger)
            .join(last, last.c.id == ledger.c.id)
            .join(users, users.c.id == ledger.c.user_id)
            .where(last.c.status == "failed")
            .order_by(ledger.c.id)
            .limit(limit)
        )
        with reading(self.engine, "read the run's failures") as conn:
            rows = conn.execute(query, {"run": run_id})
            return [(int(r[0]), str(r[1]), str(r[2]), r[3]) for r in rows]

    def rows_by_run(self, run_ids: list[str]) -> dict[str, tuple[int, int]]:
        """Rows done and their estimated total, for each of these runs that has any."""
        if not run_ids:
            return {}
        query = (
            sa.select(
                ledger.c.run_id, sa.func.sum(ledger.c.rows_done), sa.func.sum(ledger.c.rows_total)
            )
            .where(ledger.c.run_id.in_(run_ids), ledger.c.rows_done.is_not(None))
            .group_by(ledger.c.run_id)
        )
        with reading(self.engine, "read the runs' rows done") as conn:
            return {str(r[0]): (int(r[1] or 0), int(r[2] or 0)) for r in conn.execute(query)}

    def rows_done(self, run_id: str) -> tuple[int, int]:
        """Rows the run's backfills have done so far over all its users, and the estimated
        total of those the run has reached."""
        return self.rows_by_run([run_id]).get(run_id, (0, 0))

    def moved_users(self, run_id: str) -> list[MovedUser]:
        """Users the run brought up at least one step, with the version each had before."""
        query = (
            sa.select(users.c.id, users.c.clerk_id, sa.func.min(ledger.c.version))
            .join(users, users.c.id == ledger.c.user_id)
            .where(
                ledger.c.run_id == run_id,
                ledger.c.direction == "up",
                ledger.c.status == "completed",
            )
            .group_by(users.c.id, users.c.clerk_id)
            .order_by(users.c.id)
        )
        with reading(self.engine, "read what the run moved") as conn:
            return [MovedUser(int(r[0]), str(r[1]), int(r[2]) - 1) for r in conn.execute(query)]

    # -- distributed runs ----------------------------------------------------------------

    def hand_out(
        self, run_id: str, decide: Callable[[DispatchRow], tuple[str | None, int]]
    ) -> tuple[list[tuple[int, str | None]], int]:
        """One step of a distributed run's dispatch, in one transaction: ``decide`` looks
        at the run (locked; a second caller returns at once with nothing) and says why it
        must halt (or None) and how many users to hand out now; their task rows are
        written ``queued`` and the run's cursor moved; a run with nothing in flight and
        nothing left (or stopped) is closed. Returns the users handed out, with their
        queue, for the caller to publish; and how many of the run's users are in flight now."""
        with writing(self.engine, "hand out the run's next users") as conn:
            row = conn.execute(
                sa.select(runs).where(runs.c.id == run_id).with_for_update(skip_locked=True)
            ).first()
            if row is None or row.ended_at is not None:
                return [], 0
            run = dispatch_row(row)
            halt, room = decide(run)
            values: dict[str, object] = {}
            state, exhausted, in_flight = run.state, run.exhausted, run.in_flight
            if state == "running" and halt is not None:
                state = values["state"] = "halted"
                values["halt_reason"] = halt
            page: Sequence[sa.Row[tuple[int, str, int, str | None]]] = []
            if state == "running" and not exhausted and room > 0:
                page, exhausted = self._next_page(conn, row, run, room)
                in_flight += len(page)
                values |= {
                    "dispatched": run.dispatched + len(page),
                    "in_flight": in_flight,
                    "exhausted": exhausted,
                }
                if page:
                    values["cursor_version"] = int(page[-1].schema_version)
                    values["cursor_user"] = int(page[-1].user_id)
            if in_flight == 0 and (exhausted or state != "running"):
                values |= _closing(row, state)
            if values:
                values["updated_at"] = utcnow()
                conn.execute(runs.update().where(runs.c.id == run_id).values(**values))
        return [(int(r.user_id), r.queue) for r in page], in_flight

    @staticmethod
    def _next_page(
        conn: sa.Connection, row: sa.Row[tuple[object, ...]], run: DispatchRow, room: int
    ) -> tuple[Sequence[sa.Row[tuple[int, str, int, str | None]]], bool]:
        """The next page of the run's selection after its cursor, written as queued
        task rows; and whether the selection is exhausted."""
        spec = run.spec
        cursor = (
            -1 if row.cursor_version is None else int(str(row.cursor_version)),
            -1 if row.cursor_user is None else int(str(row.cursor_user)),
        )
        query = outdated_query(
            run.target_version,
            after=cursor,
            limit=room,
            statuses=spec.statuses,
            untouched_since=row.started_at,
            only_version=spec.selection.only_version,
            user_ids=spec.user_ids,
        )
        page = conn.execute(query).all()
        limit = spec.selection.limit
        exhausted = len(page) < room or (limit is not None and run.dispatched + len(page) >= limit)
        if page:
            now = utcnow()
            conn.execute(
                run_tasks.insert(),
                [
                    {
                        "run_id": run.run_id,
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

    def stop(self, run_id: str, state: str, reason: str) -> bool:
        """Mark a running run ``interrupted`` or ``halted`` (it is closed by the next
        :meth:`hand_out` once nothing is in flight); False when it was not running."""
        if state not in ("interrupted", "halted"):
            raise InputError(f"a run can be stopped as interrupted or halted, not {state}")
        with single(self.engine, "stop the run") as conn:
            stopped = conn.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.state == "running")
                .values(state=state, halt_reason=reason, updated_at=utcnow())
            ).rowcount
        return stopped == 1


DISPATCH_COLUMNS = (
    "id, state, options, target_version, in_flight, dispatched, exhausted, succeeded, failed"
)


def dispatch_row(row: sa.Row[tuple[object, ...]]) -> DispatchRow:
    return DispatchRow(
        run_id=str(row.id),
        state=str(row.state),
        spec=RunSpec.from_json(str(row.options)),
        target_version=int(str(row.target_version)),
        in_flight=int(str(row.in_flight)),
        dispatched=int(str(row.dispatched)),
        exhausted=bool(row.exhausted),
        succeeded=int(str(row.succeeded)),
        failed=int(str(row.failed)),
    )


def _closing(row: sa.Row[tuple[object, ...]], state: str) -> dict[str, object]:
    """A run's last write: its end state; a stopped run's users never handed out are
    counted not started."""
    values: dict[str, object] = {"ended_at": utcnow()}
    if state == "running":
        values["state"] = "completed"
    else:
        total = int(str(row.total))
        never = max(0, int(str(row.planned or 0)) - total)
        values["not_started"] = int(str(row.not_started)) + never
        values["total"] = total + never
    return values


# Take the task unless it is done or its run has stopped, and say what was there before.
#: A run that ended having moved (or tried, or left out) nobody: a no-op run
_NOOP = sa.and_(
    runs.c.state == "completed",
    runs.c.succeeded == 0,
    runs.c.failed == 0,
    runs.c.busy == 0,
    runs.c.not_started == 0,
)


def _last_rows() -> sa.Subquery:
    """Per user of the run ``:run``, its last ledger row that is not ``skipped`` (rows
    are written in step order, a retry after a failure as a new row): the user ended
    ``failed`` or ``completed`` by that row's status (``running``: not settled)."""
    last = (
        sa.select(sa.func.max(ledger.c.id).label("id"))
        .where(ledger.c.run_id == sa.bindparam("run"), ledger.c.status != "skipped")
        .group_by(ledger.c.user_id)
        .subquery()
    )
    return sa.select(ledger.c.id, ledger.c.status).join(last, last.c.id == ledger.c.id).subquery()


def _ledger_outcomes() -> sa.Select[Any]:
    """(users failed, users succeeded) by the ledger's rows of the run ``:run``."""
    last = _last_rows()
    return sa.select(
        sa.func.sum(sa.case((last.c.status == "failed", 1), else_=0)),
        sa.func.sum(sa.case((last.c.status == "completed", 1), else_=0)),
    ).select_from(last)


_LEDGER_OUTCOMES = _ledger_outcomes()
