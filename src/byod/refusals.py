"""What the runner refuses before it touches an instance (bad input: nothing changed)."""

from __future__ import annotations

from byod.controlplane import Config, User
from byod.errors import IrreversibleError, NotConnectedError
from byod.registry import Plan, Registry, Step
from byod.targets import Target

__all__ = ["refuse_disconnected", "refuse_in_progress", "refuse_irreversible"]


def refuse_disconnected(user: User, config: Config) -> None:
    """A disconnected user is not migrated: reconnect first."""
    if config.connection_status == "disconnected":
        raise NotConnectedError(
            f"user {user.id} ({user.clerk_id}) is disconnected: reconnect with `byod connect`"
        )


def refuse_irreversible(user: User, plan: Plan) -> None:
    """A rollback that would cross a migration without ``down``."""
    blocked = [s.migration.id for s in plan.steps if not s.migration.reversible]
    if blocked:
        raise IrreversibleError(
            f"user {user.id} ({user.clerk_id}): cannot roll back to version "
            f"{plan.to_version}: {', '.join(blocked)} has no down; nothing was changed"
        )


def refuse_in_progress(registry: Registry, user: User, current: int, target: Target) -> None:
    """A rollback would leave behind the schema change of a phased step still in
    progress (its backfills not finished)."""
    following = registry.after(current)
    if not following or not following[0].phased:
        return
    if target.read_progress(Step(following[0], "up")) is not None:
        raise IrreversibleError(
            f"user {user.id} ({user.clerk_id}): {following[0].id} is in progress (its "
            "backfills are not finished): run `byod migrate` to finish it, then roll back"
        )
