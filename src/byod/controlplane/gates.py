"""Reads and writes ``byod_gates``: which gated migrations an operator opened (or closed
again), and which users hold a gate (eligible users not through the steps before it, or
not back before it)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from byod.clock import utcnow
from byod.controlplane._tx import insert_or, reading, single
from byod.controlplane.schema import configs, gates, users
from byod.registry import Registry

__all__ = ["GateRecord", "GateView", "Holders", "gate_records", "gate_views", "holders", "set_gate"]

#: how many of the users holding a gate are named (the rest are counted)
NAMED = 10


@dataclass(frozen=True)
class GateRecord:
    """A gate as recorded: ``open`` or ``closed``, who changed it and when, and the
    users left behind then (byod ids)."""

    migration_id: str
    state: str
    changed_by: str
    changed_at: datetime
    excluded: tuple[int, ...] = ()


@dataclass(frozen=True)
class Holders:
    """The eligible users holding a gate: how many, and the first few (id, clerk id)."""

    count: int
    named: tuple[tuple[int, str], ...]

    def describe(self) -> str:
        """``2 users (1 ana, 2 bob)`` / ``12 users (… and 2 more)``."""
        shown = ", ".join(f"{uid} {clerk}" for uid, clerk in self.named)
        more = self.count - len(self.named)
        plural = "user" if self.count == 1 else "users"
        return f"{self.count} {plural} ({shown}{f' and {more} more' if more else ''})"


def gate_records(engine: sa.Engine) -> dict[str, GateRecord]:
    """Every gate ever opened or closed, by migration id."""
    with reading(engine, "read the gates") as conn:
        rows = conn.execute(sa.select(gates)).all()
    return {
        str(r.migration_id): GateRecord(
            str(r.migration_id),
            str(r.state),
            str(r.changed_by),
            r.changed_at,
            tuple(int(part) for part in (r.excluded or "").split(",") if part),
        )
        for r in rows
    }


def holders(
    engine: sa.Engine,
    *,
    below: int | None = None,
    above: int | None = None,
    excluded: Collection[int] = (),
) -> Holders:
    """Eligible users (``connected`` or ``error``, not removed, not ``excluded``) whose
    recorded version is below ``below`` (not through the steps before a gate) or above
    ``above`` (past it, for closing it again)."""
    where: list[sa.ColumnElement[bool]] = [
        configs.c.connection_status.in_(("connected", "error")),
        users.c.removed_at.is_(None),
    ]
    if below is not None:
        where.append(configs.c.schema_version < below)
    if above is not None:
        where.append(configs.c.schema_version > above)
    if excluded:
        where.append(configs.c.user_id.not_in(list(excluded)))
    joined = configs.join(users, users.c.id == configs.c.user_id)
    with reading(engine, "find the users holding a gate") as conn:
        count = conn.execute(
            sa.select(sa.func.count()).select_from(joined).where(*where)
        ).scalar_one()
        named = conn.execute(
            sa.select(users.c.id, users.c.clerk_id)
            .select_from(joined)
            .where(*where)
            .order_by(users.c.id)
            .limit(NAMED)
        ).all()
    return Holders(int(count), tuple((int(uid), str(clerk)) for uid, clerk in named))


def set_gate(
    engine: sa.Engine, migration_id: str, state: str, by: str, excluded: Collection[int]
) -> GateRecord:
    """Record ``migration_id``'s gate as ``state`` (``open`` or ``closed``)."""
    record = GateRecord(migration_id, state, by[:255], utcnow(), tuple(sorted(excluded)))
    values = {
        "migration_id": record.migration_id,
        "state": record.state,
        "changed_by": record.changed_by,
        "changed_at": record.changed_at,
        "excluded": ",".join(str(uid) for uid in record.excluded) or None,
    }
    insert = insert_or(engine, gates)
    changed = {key: value for key, value in values.items() if key != "migration_id"}
    with single(engine, "record the gate") as conn:
        conn.execute(
            insert.values(values).on_conflict_do_update(
                index_elements=[gates.c.migration_id], set_=changed
            )
        )
    return record


@dataclass(frozen=True)
class GateView:
    """A gated migration of the folder: its gate's state (``closed`` until opened), who
    changed it and when, the users left behind then, and how many eligible users are
    not through the steps before it (``waiting``) or past it (``through``)."""

    migration_id: str
    version: int
    state: str
    changed_by: str | None
    changed_at: datetime | None
    excluded: tuple[int, ...]
    waiting: int
    through: int


def gate_views(engine: sa.Engine, registry: Registry) -> list[GateView]:
    """Every gated migration of ``registry``, oldest first, with its gate."""
    gated = [m for m in registry if m.gated]
    if not gated:
        return []
    records = gate_records(engine)
    views = []
    for migration in gated:
        record = records.get(migration.id)
        views.append(
            GateView(
                migration.id,
                migration.version,
                record.state if record else "closed",
                record.changed_by if record else None,
                record.changed_at if record else None,
                record.excluded if record else (),
                holders(engine, below=migration.version - 1).count,
                holders(engine, above=migration.version - 1).count,
            )
        )
    return views
