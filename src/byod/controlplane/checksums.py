"""Writes ``byod_checksums``: the checksum each migration had when it was first applied
anywhere in the fleet. Invariant: a row is written once and never changed, so a fleet run
can tell, before any user starts, that a file was edited after it ran somewhere."""

from __future__ import annotations

import sqlalchemy as sa

from byod.clock import utcnow
from byod.controlplane._tx import insert_or, reading, single, writing
from byod.controlplane.schema import accepted_checksums, applied_checksums, configs
from byod.errors import DriftError
from byod.registry import Migration, Registry

__all__ = [
    "applied_checksums_of",
    "record_acceptance",
    "record_applied_checksum",
    "refuse_drift_up_front",
    "users_at_or_above",
]


def record_applied_checksum(engine: sa.Engine, migration: Migration) -> None:
    """Keep ``migration``'s checksum as first applied (a second writer's row is kept)."""
    row = {
        "migration_id": migration.id,
        "version": migration.version,
        "checksum": migration.checksum,
        "legacy_checksum": migration.legacy_checksum or None,
        "recorded_at": utcnow(),
    }
    insert = insert_or(engine, applied_checksums)
    with single(engine, "record the applied checksum") as conn:
        # recorded already (by this run or another): the first one stands
        conn.execute(insert.values(row).on_conflict_do_nothing())


def record_acceptance(
    engine: sa.Engine, migration: Migration, old: str | None, users: int, by: str
) -> None:
    """An operator accepted ``migration``'s file as it is now (``verify --accept``):
    who, when, the old and new checksums, how many instances were restamped; the
    fleet's reference checksum becomes the new one. (The one exception to this table's
    write-once rule, and it is recorded.)"""
    now = utcnow()
    with writing(engine, "record the accepted checksum") as conn:
        conn.execute(
            accepted_checksums.insert().values(
                migration_id=migration.id,
                old_checksum=old,
                new_checksum=migration.checksum,
                users=users,
                accepted_by=by[:255],
                accepted_at=now,
            )
        )
        conn.execute(
            applied_checksums.delete().where(applied_checksums.c.migration_id == migration.id)
        )
        conn.execute(
            applied_checksums.insert().values(
                migration_id=migration.id,
                version=migration.version,
                checksum=migration.checksum,
                legacy_checksum=migration.legacy_checksum or None,
                recorded_at=now,
            )
        )


def applied_checksums_of(engine: sa.Engine) -> dict[str, tuple[str, str | None]]:
    """Migration id -> (checksum, legacy checksum) as first applied."""
    query = sa.select(
        applied_checksums.c.migration_id,
        applied_checksums.c.checksum,
        applied_checksums.c.legacy_checksum,
    )
    with reading(engine, "read the applied checksums") as conn:
        return {str(r[0]): (str(r[1]), r[2]) for r in conn.execute(query)}


def users_at_or_above(engine: sa.Engine, version: int) -> int:
    """How many users the control plane records at ``version`` or past it."""
    query = sa.select(sa.func.count()).where(configs.c.schema_version >= version)
    with reading(engine, "count the users a migration touched") as conn:
        return int(conn.execute(query.select_from(configs)).scalar_one())


def refuse_drift_up_front(engine: sa.Engine, registry: Registry) -> None:
    """Before a fleet run starts any user: :class:`DriftError` naming every migration
    whose file changed since it was first applied, and how many users have it; nothing
    recorded, nothing touched. (Each user's stamp is still checked as a safety net.)"""
    applied = applied_checksums_of(engine)
    changed = []
    for migration in registry:
        recorded = applied.get(migration.id)
        if recorded is None or migration.checksum_matches(recorded[0]):
            continue
        if recorded[1] and migration.checksum_matches(recorded[1]):
            continue
        users = users_at_or_above(engine, migration.version)
        changed.append(f"{migration.id} (applied on {users} users)")
    if changed:
        raise DriftError(
            f"drift: {', '.join(changed)} changed after it was applied; the run was refused "
            "before any user started",
            hint="Restore the file as it was applied (`byod verify` shows the users), and "
            "put the change in a new migration.",
        )
