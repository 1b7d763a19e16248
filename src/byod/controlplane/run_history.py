"""Read-only queries for a run's own page and the fleet's shape over time: when each user
of a run finished, what each step did, and users per version at past moments."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from byod.controlplane._tx import reading
from byod.controlplane.schema import configs, ledger

__all__ = ["StepCount", "step_counts", "users_finished_at", "versions_at"]


@dataclass(frozen=True)
class StepCount:
    """How many of one step's rows in a run ended one way."""

    migration_id: str
    direction: str
    status: str
    count: int


def users_finished_at(engine: sa.Engine, run_id: str) -> list[datetime]:
    """When each user the run worked on had its last step of the run end, oldest first
    (users whose rows are all still open are left out)."""
    query = (
        sa.select(sa.func.max(ledger.c.completed_at))
        .where(ledger.c.run_id == run_id, ledger.c.completed_at.is_not(None))
        .group_by(ledger.c.user_id)
    )
    with reading(engine, "read the run's timeline") as conn:
        return sorted(at for at in conn.execute(query).scalars() if at is not None)


def step_counts(engine: sa.Engine, run_id: str) -> list[StepCount]:
    """The run's ledger rows counted by step and status, by migration."""
    query = (
        sa.select(ledger.c.migration_id, ledger.c.direction, ledger.c.status, sa.func.count())
        .where(ledger.c.run_id == run_id)
        .group_by(ledger.c.migration_id, ledger.c.direction, ledger.c.status)
        .order_by(ledger.c.migration_id, ledger.c.direction, ledger.c.status)
    )
    with reading(engine, "read the run's steps") as conn:
        return [StepCount(str(m), str(d), str(s), int(n)) for m, d, s, n in conn.execute(query)]


def versions_at(engine: sa.Engine, moments: list[datetime]) -> list[dict[int, int]]:
    """Users per schema version at each moment, as the ledger tells it: each connected
    user's version after its last completed step by then (0 before any). Users
    connected later are counted from when they appear in the ledger."""
    results: list[dict[int, int]] = []
    with reading(engine, "read the fleet's versions over time") as conn:
        user_count = conn.execute(sa.select(sa.func.count()).select_from(configs)).scalar_one()
        for moment in moments:
            last = (
                sa.select(ledger.c.user_id, sa.func.max(ledger.c.id).label("last_id"))
                .where(ledger.c.status == "completed", ledger.c.completed_at <= moment)
                .group_by(ledger.c.user_id)
                .subquery()
            )
            after = sa.case(
                (ledger.c.direction == "up", ledger.c.version), else_=ledger.c.version - 1
            )
            query = (
                sa.select(after, sa.func.count())
                .select_from(ledger.join(last, ledger.c.id == last.c.last_id))
                .group_by(after)
            )
            counts = {int(version): int(n) for version, n in conn.execute(query)}
            unmoved = int(user_count) - sum(counts.values())
            if unmoved > 0:
                counts[0] = counts.get(0, 0) + unmoved
            results.append(counts)
    return results
