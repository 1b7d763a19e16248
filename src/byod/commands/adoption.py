"""Taking over what byod did not write: instances Alembic manages (``byod adopt``), and
an applied migration's harmless change (``byod verify --accept``)."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from byod.adoption import Adoption, adopt_user
from byod.controlplane import User, local_user, record_acceptance
from byod.errors import ByodError, ControlPlaneError, InputError
from byod.registry import Migration
from byod.sources import is_alembic_history
from byod.spec import DEFAULT_CONCURRENCY
from byod.targets.sql import SqlTarget

if TYPE_CHECKING:
    from byod.runner import Runner
    from byod.workspace import Workspace

__all__ = ["Accepted", "accept_checksum", "adopt"]


def adopt(
    ws: Workspace,
    user_ref: str | None,
    *,
    by: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> list[Adoption]:
    """Adopt one user's instance (``user_ref``) or every configured user's,
    ``concurrency`` at a time: byod's stamp written at the revision each instance's
    ``alembic_version`` names (see :mod:`byod.adoption`); one user's refusal never stops
    the others. ``by`` names who asked (default: this process's OS user)."""
    source = ws.settings.migrations_dir
    if not is_alembic_history(source):
        raise InputError(
            f"{source} is not an Alembic history: `byod adopt` takes over instances Alembic "
            "manages; point --migrations (BYOD_MIGRATIONS) at the app's alembic.ini, its "
            "script location or its versions/ folder"
        )
    ws.require_tables()
    runner = ws.runner()
    directory = ws.directory
    if user_ref is not None:
        users = [directory.find_user(user_ref)]
    else:
        users = [directory.get_user(user_id) for user_id in directory.configured_user_ids()]
    who = by or local_user()
    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="byod-adopt") as pool:
        return list(pool.map(lambda user: adopt_user(runner, user, by=who), users))


@dataclass(frozen=True)
class Accepted:
    """One instance whose stamp took an accepted migration's new checksum
    (``old``: what it had; None: not applied there, or up to date) or could not."""

    user_id: int
    clerk_id: str
    old: str | None
    error: str | None = None


def accept_checksum(
    ws: Workspace, migration_id: str, user_ref: str | None, *, by: str | None = None
) -> list[Accepted]:
    """After a change to an applied migration's file that does not change what it did
    (``verify`` says it changed): each instance's stamp (one user's, or every configured
    user's) takes the file's checksum now, under the instance's lock; the fleet's
    reference checksum too, recorded with who, when, the old and the new checksum."""
    migration = ws.registry.get(migration_id)
    if migration is None:
        raise InputError(f"no migration {migration_id!r} in {ws.settings.migrations_dir}")
    ws.require_tables()
    directory, runner = ws.directory, ws.runner()
    if user_ref is not None:
        users = [directory.find_user(user_ref)]
    else:
        users = [directory.get_user(user_id) for user_id in directory.configured_user_ids()]
    done = [_accept_one(runner, user, migration) for user in users]
    olds = [a.old for a in done if a.old is not None]
    record_acceptance(
        ws.engine, migration, olds[0] if olds else None, len(olds), by or local_user()
    )
    return done


def _accept_one(runner: Runner, user: User, migration: Migration) -> Accepted:
    try:
        config = runner.directory.claim_lease(user.id, runner.owner, runner.lease_seconds)
    except ByodError as exc:
        return Accepted(user.id, user.clerk_id, None, exc.message)
    try:
        credentials = runner.unseal(config)
        with runner.connect(credentials) as target:
            if not isinstance(target, SqlTarget):
                return Accepted(user.id, user.clerk_id, None, "not a SQL instance: untouched")
            return Accepted(user.id, user.clerk_id, target.accept_checksum(migration))
    except ControlPlaneError:
        raise
    except ByodError as exc:
        return Accepted(user.id, user.clerk_id, None, exc.message)
    finally:
        with contextlib.suppress(ControlPlaneError):
            runner.directory.release_lease(user.id, runner.owner)
