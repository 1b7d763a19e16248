"""Adopting instances Alembic manages (``byod adopt``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from byod.adoption import Adoption, adopt_user
from byod.controlplane import local_user
from byod.errors import InputError
from byod.sources import is_alembic_history
from byod.spec import DEFAULT_CONCURRENCY

if TYPE_CHECKING:
    from byod.workspace import Workspace

__all__ = ["adopt"]


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
