"""One user of a fleet run, wherever it runs (a thread, a worker process, a queue worker):
transient failures retried with backoff, and the outcome the run's summary counts."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from byod.controlplane import User
from byod.errors import BusyError, ByodError, NotConnectedError, UnknownUserError
from byod.runner import Runner, UserResult

if TYPE_CHECKING:
    from byod.fleet import FleetOptions

__all__ = ["OUTCOMES", "FleetError", "Settled", "attempt", "settle"]

log = logging.getLogger("byod.fleet")

#: How a user of a fleet run can end (``not_started``: the run halted before it).
OUTCOMES = ("succeeded", "failed", "skipped", "not_started")


@dataclass(frozen=True)
class FleetError:
    """A user the run could not bring to its target, and why."""

    user: str
    migration: str | None
    error: str


@dataclass(frozen=True)
class Settled:
    """How one user of a fleet run ended: ``outcome`` (one of :data:`OUTCOMES`), the
    runner's result when there is one, the tries made, and the error the summary lists."""

    user: User
    outcome: str
    result: UserResult | None
    tries: int
    error: FleetError | None = None


def attempt(
    runner: Runner,
    action: str,
    user: User,
    to_version: int,
    options: FleetOptions,
    stop: threading.Event | None,
) -> tuple[UserResult, int]:
    """Run one user (``migrate`` or ``rollback``), retrying transient failures with
    backoff; returns the result and the number of tries."""
    tries = 0
    while True:
        if action == "rollback":
            result = runner.rollback_user(user, to_version)
        else:
            result = runner.migrate_user(user, to_version=to_version)
        tries += 1
        error = result.error
        if error is None or not error.transient or tries > options.retries:
            return result, tries
        delay = options.backoff(tries - 1)
        log.info("user %s: %s; retry %d in %.2fs", user.id, error.message, tries, delay)
        if stop is None:
            time.sleep(delay)
        elif stop.wait(delay):
            return result, tries


def settle(
    runner: Runner,
    action: str,
    user: User,
    to_version: int,
    options: FleetOptions,
    stop: threading.Event | None,
    *,
    reraise: tuple[type[ByodError], ...] = (),
) -> Settled:
    """Run one user (with :func:`attempt`) and say how it ended; never raises for one
    user's trouble, so it can never end a whole run. Errors of the ``reraise`` kinds
    (e.g. a control plane out of reach, for a caller that can wait) are raised instead
    of being counted as the user's failure."""
    try:
        result, tries = attempt(runner, action, user, to_version, options, stop)
    except reraise:
        raise
    except (NotConnectedError, UnknownUserError) as exc:  # vanished meanwhile
        log.warning("fleet: user %s was not run: %s", user.id, exc.message)
        return Settled(user, "skipped", None, 0)
    except Exception as exc:
        text = exc.message if isinstance(exc, ByodError) else f"internal error: {exc!r}"
        log.error("fleet: user %s failed: %s", user.id, text, exc_info=True)
        return Settled(user, "failed", None, 1, FleetError(user.clerk_id, None, text))
    if isinstance(result.error, reraise):
        raise result.error
    if result.error is None:
        return Settled(user, "succeeded" if result.changed else "skipped", result, tries)
    if isinstance(result.error, BusyError):  # another runner is working on this user
        return Settled(user, "skipped", result, tries)
    error = FleetError(result.clerk_id, result.failed_migration, result.error.message)
    return Settled(user, "failed", result, tries, error)
