"""Which users a fleet run takes: sized before it starts, then streamed page by page.

``--users`` are resolved up front (an unknown one is bad input at once); every other
selection is a keyset-paged walk of the outdated-users index, so memory stays flat.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from byod.clock import utcnow
from byod.controlplane import User, count_outdated_by_key, iter_outdated
from byod.errors import ByodError, ControlPlaneError, CredentialsError
from byod.fleet.outcome import control_plane_patience
from byod.runner import Runner
from byod.spec import ELIGIBLE_STATUSES, FleetOptions, Selection

__all__ = ["Item", "SelectionSize", "limited", "outdated", "require_key", "size_selection"]

log = logging.getLogger("byod.fleet")


@dataclass(frozen=True)
class Item:
    """One user a run takes, and the version it brings the user to."""

    user: User
    to_version: int


def outdated(
    runner: Runner, target: int, only_version: int | None, options: FleetOptions
) -> Iterator[Item]:
    """The outdated users, page by page; a control plane out of reach while reading the
    next page is waited for (as long as one user would wait), then the read goes on
    after the last user handed out."""
    started = utcnow()
    after = (-1, -1)
    failing_since: float | None = None
    while True:
        try:
            for row in iter_outdated(
                runner.engine,
                target,
                statuses=ELIGIBLE_STATUSES,
                untouched_since=started,
                only_version=only_version,
                after=after,
            ):
                after, failing_since = (row.schema_version, row.user_id), None
                yield Item(User(row.user_id, row.clerk_id), target)
            return
        except ControlPlaneError as exc:
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since > control_plane_patience(options):
                raise
            log.warning("fleet: cannot read the next users: %s; trying again", exc.message)
            time.sleep(0.5)


@dataclass(frozen=True)
class SelectionSize:
    """A selection sized before a run starts (never more than counts in memory, except
    ``--users``, which is resolved up front so an unknown user is bad input at once)."""

    target: int
    #: users the run will take (at most ``--limit``)
    planned: int
    #: users with no config or a ``pending``/``disconnected`` connection
    not_eligible: int
    #: users already at the target: of ``--users``, or of the whole eligible fleet
    #: (not with ``--only-version`` or ``--limit``, which take a part of it)
    up_to_date: int
    #: ``--users`` still to run; None: the outdated users of the index
    listed: tuple[User, ...] | None


def size_selection(
    runner: Runner, selection: Selection, to_version: int | None = None
) -> SelectionSize:
    """The target (default head; an unknown one is bad input) and the selection's size."""
    target = runner.registry.head if to_version is None else to_version
    runner.registry.plan_up(0, target)
    if selection.users is None:
        listed = None
        # users already at the target are the run's too: counted up to date, not taken
        planned, sealed_here, up_to_date, not_eligible = count_outdated_by_key(
            runner.engine,
            target,
            statuses=ELIGIBLE_STATUSES,
            only_version=selection.only_version,
            key_id=runner.sealer.key_id,
        )
    else:
        listed, not_eligible, up_to_date, sealed_here = _listed(runner, selection.users, target)
        planned = len(listed)
    if selection.limit is not None:
        planned = min(planned, selection.limit)
        up_to_date = up_to_date if selection.users is not None else 0
    require_key(runner, planned, sealed_here)
    return SelectionSize(target, planned, not_eligible, up_to_date, listed)


def require_key(runner: Runner, planned: int, sealed_here: int) -> None:
    """Refuse a run whose key opens none of its users (the operator's mistake, not the
    users'): before the run is recorded, before any lease, no user's status touched."""
    if planned and not sealed_here:
        raise CredentialsError(
            f"none of the {planned} selected users' credentials were sealed with the "
            f"configured key (key id {runner.sealer.key_id}): wrong encryption key; "
            "no run was started and nothing was changed"
        )


def _listed(
    runner: Runner, user_ids: tuple[int, ...], target: int
) -> tuple[tuple[User, ...], int, int, int]:
    """``--users`` looked up: those to run, how many are not eligible, how many are at
    ``target`` already, and how many of those to run were sealed with the key in use."""
    users: list[User] = []
    not_eligible = up_to_date = sealed_here = 0
    for user in dict.fromkeys(runner.directory.get_user(uid) for uid in user_ids):
        try:
            config = runner.directory.get_config(user.id)
        except ByodError:
            not_eligible += 1
            continue
        if config.connection_status not in ELIGIBLE_STATUSES:
            not_eligible += 1
        elif config.schema_version >= target:
            up_to_date += 1
        else:
            users.append(user)
            sealed_here += config.key_id == runner.sealer.key_id
    return tuple(users), not_eligible, up_to_date, sealed_here


def limited(items: Iterable[Item], limit: int) -> Iterator[Item]:
    for count, item in enumerate(items):
        if count >= limit:
            return
        yield item
