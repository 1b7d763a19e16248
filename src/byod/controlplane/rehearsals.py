"""What a rehearsal run keeps: one row per user it rehearsed (in ``byod_run_tasks``, as
a distributed run's tasks are kept), never a ledger row; and which users a rehearsal
must refuse (their instances cannot roll a migration back)."""

from __future__ import annotations

import json
from datetime import datetime

import sqlalchemy as sa

from byod.clock import utcnow
from byod.controlplane._tx import reading, single
from byod.controlplane.schema import configs, run_tasks, users
from byod.redact import mask

__all__ = [
    "REHEARSABLE_KINDS",
    "not_rehearsable",
    "record_rehearsed",
    "rehearsal_failures",
    "rehearsal_timeline",
    "rehearsed_users",
]

#: Instance kinds whose DDL a transaction can roll back.
REHEARSABLE_KINDS = ("sqlite", "postgresql")


def record_rehearsed(
    engine: sa.Engine,
    run_id: str,
    user_id: int,
    *,
    outcome: str,
    versions: tuple[int | None, int | None],
    steps: list[tuple[str, str]],
    error: tuple[str, str] | None,
    tries: int,
    seconds: float,
) -> None:
    """Keep one user's rehearsal: its outcome (``succeeded``: passed, ``failed``, …),
    versions from and to, ``(migration, status)`` of each step, ``(error class,
    message)`` if it failed."""
    now = utcnow()
    with single(engine, "record the rehearsal") as conn:
        conn.execute(
            run_tasks.insert().values(
                run_id=run_id,
                user_id=user_id,
                state="done",
                from_version=versions[0] or 0,
                to_version=versions[1],
                outcome=outcome,
                error=None if error is None else mask(error[1])[:4000],
                error_type=None if error is None else error[0],
                steps=json.dumps([{"migration": m, "status": st} for m, st in steps]),
                tries=tries,
                seconds=seconds,
                queued_at=now,
                finished_at=now,
            )
        )


def rehearsal_failures(
    engine: sa.Engine, run_id: str, limit: int = 100
) -> list[tuple[int, str, str, str | None]]:
    """(user id, clerk id, the step that failed, error) of a rehearsal run's failures."""
    query = (
        sa.select(users.c.id, users.c.clerk_id, run_tasks.c.steps, run_tasks.c.error)
        .join(users, users.c.id == run_tasks.c.user_id)
        .where(run_tasks.c.run_id == run_id, run_tasks.c.outcome == "failed")
        .order_by(run_tasks.c.finished_at, run_tasks.c.user_id)
        .limit(limit)
    )
    found = []
    with reading(engine, "read the rehearsal's failures") as conn:
        for user_id, clerk_id, steps, error in conn.execute(query):
            failed = [s["migration"] for s in json.loads(steps or "[]") if s["status"] == "failed"]
            found.append((int(user_id), str(clerk_id), failed[0] if failed else "", error))
    return found


def not_rehearsable(
    engine: sa.Engine,
    below: int,
    statuses: tuple[str, ...],
    *,
    only_version: int | None = None,
    user_ids: tuple[int, ...] | None = None,
    limit: int = 10,
) -> tuple[int, list[str]]:
    """How many users a run below ``below`` would take whose instances cannot be
    rehearsed, and the clerk ids of the first ``limit`` of them."""
    where = [
        configs.c.connection_status.in_(statuses),
        configs.c.schema_version < below,
        configs.c.target_kind.not_in(REHEARSABLE_KINDS),
    ]
    if only_version is not None:
        where.append(configs.c.schema_version == only_version)
    if user_ids is not None:
        where.append(configs.c.user_id.in_(user_ids))
    count = sa.select(sa.func.count()).select_from(configs).where(*where)
    names = (
        sa.select(users.c.clerk_id)
        .join(configs, configs.c.user_id == users.c.id)
        .where(*where)
        .order_by(users.c.id)
        .limit(limit)
    )
    with reading(engine, "find users that cannot be rehearsed") as conn:
        return int(conn.execute(count).scalar_one()), [
            str(n) for n in conn.execute(names).scalars()
        ]


def rehearsed_users(engine: sa.Engine, run_id: str, outcome: str) -> tuple[int, ...]:
    """The ids of the users a rehearsal run ended with ``outcome`` (``succeeded``: passed)."""
    query = (
        sa.select(run_tasks.c.user_id)
        .where(run_tasks.c.run_id == run_id, run_tasks.c.outcome == outcome)
        .order_by(run_tasks.c.user_id)
    )
    with reading(engine, "read the rehearsal's users") as conn:
        return tuple(int(u) for u in conn.execute(query).scalars())


def rehearsal_timeline(
    engine: sa.Engine, run_id: str
) -> tuple[list[datetime], dict[tuple[str, str], int]]:
    """When each rehearsed user finished, oldest first, and ``(migration, status)`` counts
    of their steps (a rehearsal's page, as the ledger gives a real run's)."""
    query = sa.select(run_tasks.c.finished_at, run_tasks.c.steps).where(
        run_tasks.c.run_id == run_id
    )
    finished: list[datetime] = []
    steps: dict[tuple[str, str], int] = {}
    with reading(engine, "read the rehearsal's timeline") as conn:
        for at, recorded in conn.execute(query):
            if at is not None:
                finished.append(at)
            for step in json.loads(recorded or "[]"):
                key = (str(step["migration"]), str(step["status"]))
                steps[key] = steps.get(key, 0) + 1
    return sorted(finished), steps
