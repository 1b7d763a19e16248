"""Before the chain: the instance's stamp read, checked and made the control plane's view.

The stamp is the truth about what is applied. It is read where the first step will run
(:meth:`~byod.targets.base.Target.begin`); a stamp that disagrees with the migrations
folder is drift (nothing runs); rows a lost runner left open are settled from it; the
config's ``schema_version`` is moved to it. An Alembic-managed instance without a stamp
is refused with the way to adopt it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from byod import metrics
from byod.controlplane import record_applied_checksum
from byod.errors import DeployError, DriftError
from byod.registry import Direction, Registry
from byod.results import StepResult, check_stamp
from byod.targets import StampEntry, Target

if TYPE_CHECKING:
    from byod.controlplane import Config, User
    from byod.runner.context import RunContext

__all__ = ["read_stamp", "reconcile", "refuse_unadopted", "restamp_stale"]

log = logging.getLogger("byod.runner")


def read_stamp(runner: RunContext, target: Target) -> list[StampEntry]:
    """The instance's stamp, read where the first step will run (see
    :meth:`Target.begin`); where byod's own part of the instance is not there yet
    (a Convex app deployed before it had byod's module), the deploy step puts it
    there first."""
    try:
        return target.begin(runner.deadline())
    except DeployError:
        target.prepare(runner.registry.at(1))
        return target.begin(runner.deadline())


def restamp_stale(registry: Registry, stamp: list[StampEntry], target: Target) -> None:
    """Stamp rows an older byod recorded with the file's bytes' checksum take the
    syntax checksum at the next step, under its lock (where the target can)."""
    stale = []
    for entry in stamp:
        migration = registry.get(entry.id)
        if (
            migration is not None
            and entry.checksum == migration.legacy_checksum
            and migration.legacy_checksum != migration.checksum
        ):
            stale.append(migration)
    restamp = getattr(target, "restamp_later", None)
    if stale and callable(restamp):
        restamp(stale)


def refuse_unadopted(runner: RunContext, user: User, target: Target) -> None:
    """An instance without byod's stamp that Alembic manages (its ``alembic_version``
    names a revision) is refused, with the way to adopt it: running the history from
    step 1 would meet tables that exist. Asked only with an Alembic history."""
    if not runner.alembic:
        return
    reader = getattr(target, "alembic_revisions", None)
    revisions = reader() if callable(reader) else None
    if revisions:
        raise DriftError(
            f"the instance is managed by Alembic (alembic_version {', '.join(revisions)}) "
            "and has no byod stamp: adopt it before it is migrated",
            hint=f"`byod adopt {user.id}` (or `byod adopt --all`) writes byod's stamp at "
            "that revision; nothing is run again",
        )


def reconcile(
    runner: RunContext, user: User, config: Config, stamp: list[StampEntry]
) -> tuple[int, tuple[StepResult, ...]]:
    """The instance's version, with the control plane brought in line with it; and
    the steps this same fleet run applied before its runner was lost (a task
    delivered again), found done now: the run moved the user, whoever records it."""
    registry = runner.registry
    problems = check_stamp(registry, stamp)
    if problems:
        message = "; ".join(problems)
        runner.directory.set_status(user.id, config.connection_status, error=message)
        raise DriftError(f"drift: {message}")
    current = stamp[-1].version if stamp else 0
    applied: set[tuple[str, Direction]] = {(entry.id, "up") for entry in stamp}
    applied |= {(m.id, "down") for m in registry if m.version > current}
    recovered: list[StepResult] = []
    if config.open_rows:
        settled = runner.ledger.settle_orphans(user.id, applied)
        log.warning("user %s: settled %d rows left by a lost runner", user.id, len(settled))
        metrics.LEASE_TAKEOVERS.inc()
        for row in settled:
            migration = registry.get(row.migration_id)
            if migration and row.status == "completed" and row.direction == "up":
                # the lost run may not have kept its checksum as first applied either
                record_applied_checksum(runner.engine, migration)
            mine = row.run_id is not None and row.run_id == runner.run_id
            if row.status == "completed" and mine and migration:
                recovered.append(
                    StepResult(migration.id, migration.version, row.direction, "recovered")
                )
    if current != config.schema_version or config.connection_status != "connected":
        if current != config.schema_version:
            log.warning(
                "user %s: control plane said version %s, the instance's stamp says %s; "
                "adopting the instance's",
                user.id,
                config.schema_version,
                current,
            )
        runner.directory.set_status(user.id, "connected", schema_version=current)
    return current, tuple(sorted(recovered, key=lambda step: step.version))
