"""All users: select the outdated ones, migrate them with a bounded pool, summarise.

Selection is keyset-paged (never every row in memory) and streamed into at most
``concurrency`` workers with a bounded queue, so memory stays flat as the fleet grows.
The core emits typed progress events; it never prints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from byod.controlplane import count_outdated, iter_outdated
from byod.controlplane.schema import utcnow
from byod.errors import BusyError, ByodError
from byod.runner import Runner, UserResult

__all__ = [
    "FleetError",
    "FleetEvent",
    "FleetStarted",
    "FleetSummary",
    "UserFinished",
    "migrate_all",
]

log = logging.getLogger("byod.fleet")
ELIGIBLE_STATUSES = ("connected", "error")


@dataclass(frozen=True)
class FleetStarted:
    """A fleet run starts on (about) ``total`` users."""

    total: int


@dataclass(frozen=True)
class UserFinished:
    """One user is done; ``outcome`` is succeeded, failed or skipped."""

    result: UserResult
    outcome: str


FleetEvent = FleetStarted | UserFinished


@dataclass(frozen=True)
class FleetError:
    """A user the run could not bring to its target, and why."""

    user: str
    migration: str | None
    error: str


@dataclass
class FleetSummary:
    """What a fleet run did; it never claims more than happened.

    ``skipped``: selected users that needed nothing by the time their turn came, or that
    another runner was already working on. ``not_started``: users left when the run
    stopped early (interrupted).
    """

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    not_started: int = 0
    errors: list[FleetError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no user failed and none was left unstarted."""
        return self.failed == 0 and self.not_started == 0

    def as_dict(self) -> dict[str, object]:
        """The summary as plain data (for JSON)."""
        return {
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "skipped": self.skipped,
            "not_started": self.not_started,
            "errors": [e.__dict__ for e in self.errors],
        }


def _outcome(result: UserResult) -> str:
    if result.error is None:
        return "succeeded" if result.changed else "skipped"
    return "skipped" if isinstance(result.error, BusyError) else "failed"


def migrate_all(
    runner: Runner,
    *,
    concurrency: int = 4,
    to_version: int | None = None,
    on_event: Callable[[FleetEvent], None] = lambda event: None,
) -> FleetSummary:
    """Migrate every eligible user below the target (default: head) and summarise.

    Eligible: a config whose connection is ``connected`` or ``error`` (an instance that
    was unreachable is tried again). One failing user never stops the others. Ctrl-C
    stops starting new users, lets running ones finish, and counts the rest not started.
    """
    target = runner.registry.head if to_version is None else to_version
    started_at = utcnow()
    summary = FleetSummary()
    on_event(FleetStarted(count_outdated(runner.engine, target, statuses=ELIGIBLE_STATUSES)))

    def finish(future: Future[UserResult]) -> None:
        try:
            result = future.result()
        except ByodError as exc:  # the user vanished or was disconnected meanwhile
            log.warning("fleet: a user was not migrated: %s", exc.message)
            summary.total += 1
            summary.skipped += 1
            return
        outcome = _outcome(result)
        summary.total += 1
        setattr(summary, outcome, getattr(summary, outcome) + 1)
        if outcome == "failed" and result.error is not None:
            summary.errors.append(
                FleetError(result.clerk_id, result.failed_migration, result.error.message)
            )
        on_event(UserFinished(result, outcome))

    selection = iter_outdated(
        runner.engine, target, statuses=ELIGIBLE_STATUSES, untouched_since=started_at
    )
    in_flight: set[Future[UserResult]] = set()
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="byod") as pool:
        try:
            for candidate in selection:
                while len(in_flight) >= concurrency * 2:
                    done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in done:
                        finish(future)
                in_flight.add(pool.submit(runner.migrate, candidate.user_id, to_version=target))
            for future in _drain(in_flight):
                finish(future)
        except KeyboardInterrupt:
            log.warning("fleet: interrupted; letting running users finish")
            for future in in_flight:
                if future.cancel():
                    summary.not_started += 1
            for future in _drain({f for f in in_flight if not f.cancelled()}):
                finish(future)
            summary.not_started += sum(1 for _ in selection)
    return summary


def _drain(futures: set[Future[UserResult]]) -> list[Future[UserResult]]:
    done, _ = wait(futures)
    return list(done)
