"""One user of a fleet run, wherever it runs (a thread, a worker process, a queue worker):
transient failures retried with backoff, a control plane out of reach waited for, and
the outcome the run's summary counts."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

from byod import metrics
from byod.controlplane import User
from byod.errors import (
    BusyError,
    ByodError,
    ControlPlaneError,
    NotConnectedError,
    RehearsalError,
    UnknownUserError,
)
from byod.logs import fields
from byod.rehearsal import rehearse_user
from byod.results import UserResult
from byod.runner import Runner
from byod.spec import FleetOptions

__all__ = ["FleetFailure", "Settled", "attempt", "control_plane_patience", "settle"]

log = logging.getLogger("byod.fleet")


@dataclass(frozen=True)
class FleetFailure:
    """A user the run could not bring to its target, and why."""

    user: str
    migration: str | None
    error: str


@dataclass(frozen=True)
class Settled:
    """How one user of a fleet run ended: ``outcome`` (one of :data:`byod.spec.OUTCOMES`), its
    result (always, from :func:`settle`; None only for a distributed task that never ran),
    the tries made, and the error the summary lists."""

    user: User
    outcome: str
    result: UserResult | None
    tries: int
    error: FleetFailure | None = None


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
        elif action == "rehearse":
            result = rehearse_user(runner, user, to_version=to_version)
        else:
            result = runner.migrate_user(user, to_version=to_version)
        tries += 1
        error = result.error
        if error is None or not error.transient or tries > options.retries:
            return result, tries
        delay = options.backoff(tries - 1)
        log.info(
            "%s; retry %d in %.2fs",  # the message names the user already
            error.message,
            tries,
            delay,
            extra=fields(
                run_id=runner.run_id,
                user_id=user.id,
                clerk_id=user.clerk_id,
                attempt=tries,
                outcome="retry",
                error=type(error).__name__,
            ),
        )
        if stop is None:
            time.sleep(delay)
        elif stop.wait(delay):
            return result, tries


def control_plane_patience(options: FleetOptions) -> float:
    """How long one user waits for a control plane out of reach before it fails: half its
    lease. The lease was last renewed at most a third of its life before the outage, so
    it outlives the wait: no other runner takes this live one for a lost one."""
    return options.lease_seconds / 2


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
    """Run one user (with :func:`attempt`) and say how it ended, always with a result;
    never raises for one user's trouble, so it can never end a whole run.

    A control plane out of reach is not the user's failure: the user is run again once
    it answers (backoff, for at most :func:`control_plane_patience`; a step the lost
    attempt applied is found in the stamp and counted as this run's). Errors of the
    ``reraise`` kinds are raised instead (e.g. ``ControlPlaneError``, for a caller that
    waits on its own: a distributed task)."""
    metrics.USERS_IN_FLIGHT.inc()
    try:
        settled = _settle_waiting(runner, action, user, to_version, options, stop, reraise)
    finally:
        metrics.USERS_IN_FLIGHT.dec()
    kind = (settled.result.target_kind if settled.result else None) or "unknown"
    metrics.USERS.labels(kind, settled.outcome).inc()
    if settled.tries > 1:
        metrics.RETRIES.labels(kind).inc(settled.tries - 1)
    return settled


def _settle_waiting(
    runner: Runner,
    action: str,
    user: User,
    to_version: int,
    options: FleetOptions,
    stop: threading.Event | None,
    reraise: tuple[type[ByodError], ...],
) -> Settled:
    """:func:`settle`, waiting out a control plane out of reach."""
    waited_since: float | None = None
    delay = 0.1
    while True:
        try:
            settled = _settle_once(runner, action, user, to_version, options, stop, reraise)
        except ControlPlaneError as exc:
            if isinstance(exc, reraise):
                raise
            now = time.monotonic()
            waited_since = now if waited_since is None else waited_since
            if now + delay - waited_since > control_plane_patience(options):
                log.error("fleet: user %s: control plane still out of reach: %s", user.id, exc)
                return _failure(runner, user, exc, 1)
            log.warning("user %s: %s; trying again in %.1fs", user.id, exc.message, delay)
            time.sleep(delay)
            delay = min(2.0, delay * 2)
            continue
        if waited_since is not None:
            return _moved_before(runner, settled)
        return settled


def _settle_once(
    runner: Runner,
    action: str,
    user: User,
    to_version: int,
    options: FleetOptions,
    stop: threading.Event | None,
    reraise: tuple[type[ByodError], ...],
) -> Settled:
    try:
        result, tries = attempt(runner, action, user, to_version, options, stop)
    except reraise:
        raise
    except ControlPlaneError:
        raise
    except RehearsalError as exc:  # an instance that cannot be rehearsed: skipped, said so
        log.warning("fleet: user %s not rehearsed: %s", user.id, exc.message)
        return Settled(user, "not_eligible", _no_result(runner, user, exc), 0)
    except (NotConnectedError, UnknownUserError) as exc:  # vanished meanwhile
        log.warning("fleet: user %s was not run: %s", user.id, exc.message)
        return Settled(user, "not_eligible", _no_result(runner, user, exc), 0)
    except Exception as exc:
        log.error("fleet: user %s failed: %s", user.id, exc, exc_info=True)
        return _failure(runner, user, exc, 1)
    kept: tuple[type[ByodError], ...] = (ControlPlaneError, *reraise)
    if result.error is not None and isinstance(result.error, kept):
        raise result.error
    if result.error is None:
        return Settled(user, "succeeded" if result.changed else "up_to_date", result, tries)
    if isinstance(result.error, BusyError):  # another runner is working on this user
        return Settled(user, "busy", result, tries)
    if isinstance(result.error, NotConnectedError):  # disconnected meanwhile
        return Settled(user, "not_eligible", result, tries)
    error = FleetFailure(result.clerk_id, result.failed_migration, result.error.message)
    return Settled(user, "failed", result, tries, error)


def _failure(runner: Runner, user: User, exc: Exception, tries: int) -> Settled:
    """A user that failed without a runner's result (an internal error, a control plane
    that stayed away): still one result, so it still gets its line."""
    text = exc.message if isinstance(exc, ByodError) else f"internal error: {exc!r}"
    result = _no_result(runner, user, exc)
    return Settled(user, "failed", result, tries, FleetFailure(user.clerk_id, None, text))


def _no_result(runner: Runner, user: User, exc: Exception) -> UserResult:
    error = exc if isinstance(exc, ByodError) else ByodError(f"internal error: {exc!r}")
    version = None  # no config any more, or no control plane: the version is not known
    with contextlib.suppress(ByodError):
        version = runner.directory.get_config(user.id).schema_version
    return UserResult(user.id, user.clerk_id, version, version, (), error)


def _moved_before(runner: Runner, settled: Settled) -> Settled:
    """After a wait for the control plane, a user found with nothing to do may have been
    moved by this same run's lost attempt (applied, then not recorded): it succeeded."""
    if settled.outcome != "up_to_date" or runner.run_id is None:
        return settled
    try:
        moved = runner.ledger.moved_in_run(settled.user.id, runner.run_id)
    except ByodError:
        return settled
    return dataclasses.replace(settled, outcome="succeeded") if moved else settled
