"""Adopting an instance Alembic already manages: byod's stamp written at the revision its
``alembic_version`` names, in one transaction, and nothing else.

A team arrives with a fleet its Alembic history brought part-way. Each instance's
``alembic_version`` names one revision of the chain byod loaded; adopting writes byod's
stamp for every step up to it (so nothing Alembic ran is run again), records one ledger
row ("adopted at revision R", by whom, when) and moves the control plane's version. An
unknown revision, several rows (branches), or an instance byod already stamps otherwise
is refused for that user; the others go on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from byod.errors import BusyError, ByodError, ControlPlaneError, DriftError
from byod.targets.sql import SqlTarget

if TYPE_CHECKING:
    from byod.controlplane import User
    from byod.runner import Runner

__all__ = ["Adoption", "adopt_user"]

AdoptionStatus = Literal["adopted", "already", "nothing", "refused"]


@dataclass(frozen=True)
class Adoption:
    """What adopting one user's instance did: ``adopted`` (stamp written at
    ``revision``, ``version``), ``already`` (byod's stamp said so already), ``nothing``
    (no Alembic revision applied there: a fresh instance, or a Convex deployment; byod
    migrates it from the start) or ``refused`` (``error`` says why; nothing changed)."""

    user_id: int
    clerk_id: str
    status: AdoptionStatus
    revision: str | None = None
    version: int | None = None
    error: str | None = None


def adopt_user(runner: Runner, user: User, *, by: str) -> Adoption:
    """Adopt ``user``'s instance under its lease (see the module's docstring); ``by``
    names who asked, for the ledger."""
    try:
        config = runner.directory.claim_lease(user.id, runner.owner, runner.lease_seconds)
    except BusyError as exc:
        return Adoption(user.id, user.clerk_id, "refused", error=exc.message)
    try:
        credentials = runner.unseal(config)
        with runner.connect(credentials) as target:
            if not isinstance(target, SqlTarget):  # a Convex deployment: no Alembic there
                return Adoption(user.id, user.clerk_id, "nothing")
            revisions = target.alembic_revisions()
            if not revisions:
                return Adoption(user.id, user.clerk_id, "nothing")
            revision, version = _revision_of(runner, revisions)
            steps = [m for m in runner.registry if m.version <= version]
            written = target.adopt(steps, revisions)
        if not written:
            return Adoption(user.id, user.clerk_id, "already", revision, version)
        note = f"adopted at revision {revision} (alembic_version) by {by}: byod's stamp written"
        runner.ledger.record_adopted(user.id, steps[-1], note)
        return Adoption(user.id, user.clerk_id, "adopted", revision, version)
    except ControlPlaneError:
        raise
    except ByodError as exc:
        return Adoption(user.id, user.clerk_id, "refused", error=exc.message)
    finally:
        with contextlib.suppress(ControlPlaneError):
            runner.directory.release_lease(user.id, runner.owner)


def _revision_of(runner: Runner, revisions: list[str]) -> tuple[str, int]:
    """The one revision ``alembic_version`` names, and its version in the chain."""
    if len(revisions) != 1:
        found = ", ".join(revisions) or "no row"
        raise DriftError(
            f"alembic_version holds {found}: byod adopts an instance at exactly one revision "
            "(several are branches Alembic left unmerged)"
        )
    migration = runner.registry.get(revisions[0])
    if migration is None:
        raise DriftError(
            f"alembic_version names revision {revisions[0]}, which the migrations folder "
            "does not have: point --migrations at the app's Alembic history"
        )
    return migration.id, migration.version
