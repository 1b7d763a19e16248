"""Statements for a page of users at once, so a fleet run's bookkeeping costs a few
statements a page instead of a few a user. Used by the tables' writers (the directory
for leases, the ledger for its rows), each inside its own connection or transaction.

Every statement here touches only users whose lease the caller holds (or is claiming),
so reading counts and then writing rows needs no lock: no one else writes their rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from byod.controlplane.schema import ledger
from byod.registry import Plan, Step

__all__ = [
    "PG_COMPLETE_CONFIGS",
    "PG_COMPLETE_ROWS",
    "PG_INSERT_PLANS",
    "PageCounts",
    "StepKey",
    "among",
    "as_json",
    "page_counts",
    "plan_rows",
]

#: (user, migration, direction): a step of one user
StepKey = tuple[int, str, str]


@dataclass(frozen=True)
class PageCounts:
    """What the ledger holds for a page of users: per user, the rows a lost runner left
    ``pending`` or ``running``; per step of a user, the attempts made before."""

    open_rows: dict[int, int]
    tries: dict[StepKey, int]


def among(
    column: sa.ColumnElement[int], ids: Sequence[int], dialect: sa.Dialect
) -> sa.ColumnElement[bool]:
    """``column IN ids`` as each server reads it best: on PostgreSQL one array parameter
    (a page's thousand ids are not a thousand bind parameters to render and parse)."""
    if dialect.name == "postgresql":
        return column == sa.any_(sa.bindparam(None, list(ids), type_=sa.ARRAY(sa.Integer)))
    return column.in_(list(ids))


def page_counts(conn: sa.Connection, user_ids: Sequence[int]) -> PageCounts:
    """One statement: the ledger's open rows and earlier attempts of ``user_ids``."""
    is_open = sa.case((ledger.c.status.in_(("pending", "running")), 1), else_=0)
    # what the per-user INSERT counts as an attempt (a failure before the chain is none)
    tried = sa.case(
        (
            sa.and_(
                ledger.c.status.in_(("running", "completed", "failed")),
                ledger.c.started_at.is_not(None),
            ),
            1,
        ),
        else_=0,
    )
    query = (
        sa.select(
            ledger.c.user_id,
            ledger.c.migration_id,
            ledger.c.direction,
            sa.func.sum(is_open),
            sa.func.sum(tried),
        )
        .where(among(ledger.c.user_id, user_ids, conn.dialect))
        .group_by(ledger.c.user_id, ledger.c.migration_id, ledger.c.direction)
    )
    open_rows: dict[int, int] = {}
    tries: dict[StepKey, int] = {}
    for user_id, migration_id, direction, opened, attempts in conn.execute(query):
        uid = int(user_id)
        open_rows[uid] = open_rows.get(uid, 0) + int(opened or 0)
        tries[(uid, str(migration_id), str(direction))] = int(attempts or 0)
    return PageCounts(open_rows, tries)


def plan_rows(
    plans: Iterable[tuple[int, Plan]], tries: dict[StepKey, int], run_id: str | None, now: datetime
) -> tuple[list[dict[str, object]], dict[int, int]]:
    """The ledger rows of each user's plan (the first step ``running`` with its attempt
    number, the rest ``pending``, as :meth:`Ledger.record_planned` writes one user's),
    and each user's first attempt number."""
    rows: list[dict[str, object]] = []
    attempts: dict[int, int] = {}
    for user_id, plan in plans:
        for index, step in enumerate(plan.steps):
            first = index == 0
            attempt = tries.get(_key(user_id, step), 0) + 1 if first else 0
            if first:
                attempts[user_id] = attempt
            rows.append(
                {
                    "user_id": user_id,
                    "migration_id": step.migration.id,
                    "version": step.migration.version,
                    "direction": step.direction,
                    "status": "running" if first else "pending",
                    "attempts": attempt,
                    "run_id": run_id,
                    "started_at": now if first else None,
                    "created_at": now,
                }
            )
    return rows, attempts


def _key(user_id: int, step: Step) -> StepKey:
    return (user_id, step.migration.id, step.direction)


def as_json(rows: Sequence[Mapping[str, object]]) -> str:
    """A page's rows as one JSON parameter (times in ISO 8601): the server reads it with
    ``json_to_recordset``, so a page is one short string to send, not an array a column
    that the driver would encode value by value (most of a page's client time)."""
    return json.dumps(rows, default=_iso, separators=(",", ":"))


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not a ledger value")


# PostgreSQL: a page's plans in one set-based INSERT (psycopg would otherwise send one
# INSERT a row, pipelined, each run on its own by the server)
PG_INSERT_PLANS = sa.text(
    "INSERT INTO byod_migrations (user_id, migration_id, version, direction, status,"
    " attempts, run_id, started_at, created_at)"
    " SELECT v.user_id, v.migration_id, v.version, v.direction, v.status, v.attempts,"
    " :run_id, v.started_at, :now FROM json_to_recordset(CAST(:rows AS json))"
    " AS v(user_id integer, migration_id text, version integer, direction text,"
    " status text, attempts integer, started_at timestamp)"
)

# PostgreSQL: a batch of last steps in two set-based statements (the batch one JSON
# parameter), not one statement per user: the ledger rows still ``running`` completed,
# then each user's config moved to its version, the lease given back by its owner.
_BATCH = (
    "json_to_recordset(CAST(:rows AS json)) AS v(user_id integer, migration_id text,"
    " direction text, version integer, started_at timestamp, completed_at timestamp,"
    " owner text)"
)
PG_COMPLETE_ROWS = sa.text(
    "UPDATE byod_migrations AS m SET status = 'completed', completed_at = v.completed_at,"
    " error = NULL, started_at = coalesce(v.started_at, m.started_at)"
    f" FROM {_BATCH}"
    " WHERE m.user_id = v.user_id AND m.migration_id = v.migration_id"
    " AND m.direction = v.direction AND m.status = 'running'"
)
PG_COMPLETE_CONFIGS = sa.text(
    "UPDATE byod_configs AS c SET schema_version = v.version, connection_status = 'connected',"
    " last_error = NULL, updated_at = v.completed_at,"
    " lease_owner = CASE WHEN c.lease_owner = v.owner THEN NULL ELSE c.lease_owner END,"
    " lease_expires_at = CASE WHEN c.lease_owner = v.owner THEN NULL"
    " ELSE c.lease_expires_at END"
    f" FROM {_BATCH} WHERE c.user_id = v.user_id"
)
