"""What a user that could not be migrated leaves behind, where operators look.

A refusal before the chain started is one ``failed`` ledger row for the step the control
plane expected to run next (attempts 0, never started, its error class first), a log
record with the run's event fields, and a result whose error names the user. An
unreachable instance also sets the config's status to ``error`` and tells the notifier.
Nothing here touches an instance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from byod.errors import ByodError, CredentialsError
from byod.logs import fields
from byod.notify import Notice, safe_notify
from byod.registry import Plan, Step
from byod.results import StepResult, UserResult

if TYPE_CHECKING:
    from byod.controlplane import Config, User
    from byod.runner.context import RunContext

__all__ = ["foreign_key", "gave_up", "refused", "step_fields", "unreachable"]

log = logging.getLogger("byod.runner")


def gave_up(
    runner: RunContext,
    user: User,
    version: int,
    exc: ByodError,
    *,
    steps: tuple[StepResult, ...] = (),
) -> UserResult:
    """The user's result when nothing was run (``steps``: the one it would have run,
    reported ``failed``); logged with the run's event fields, outcome ``refused``."""
    first = steps[0] if steps else None
    log.error(
        "user %s: %s: %s",
        user.id,
        type(exc).__name__,
        exc.message,
        extra=fields(
            run_id=runner.run_id,
            user_id=user.id,
            clerk_id=user.clerk_id,
            migration=first.migration_id if first else None,
            direction=first.direction if first else None,
            outcome="refused",
            error=type(exc).__name__,
        ),
    )
    failure = type(exc)(f"user {user.id} ({user.clerk_id}): {exc.message}", hint=exc.hint)
    return UserResult(user.id, user.clerk_id, version, version, steps, failure)


def refused(
    runner: RunContext,
    user: User,
    config: Config,
    make_plan: Callable[[int], Plan],
    exc: ByodError,
) -> UserResult:
    """Give up before the chain started, leaving a trail where operators look: a
    ``failed`` ledger row, error class first, for the step the control plane expects
    to run next (none when it expects nothing to run)."""
    try:
        steps = make_plan(config.schema_version).steps
    except ByodError:
        steps = ()
    if not steps:
        return gave_up(runner, user, config.schema_version, exc)
    step, text = steps[0], f"{type(exc).__name__}: {exc.message}"
    runner.ledger.record_not_started(user.id, step, text, runner.run_id)
    failed = StepResult(step.migration.id, step.migration.version, step.direction, "failed")
    return gave_up(runner, user, config.schema_version, exc, steps=(failed,))


def foreign_key(runner: RunContext, config: Config) -> CredentialsError:
    """The error for credentials sealed with another key than the runner's."""
    return CredentialsError(
        f"its credentials were sealed with key {config.key_id}, but the configured key "
        f"is {runner.sealer.key_id}: wrong encryption key; nothing was changed"
    )


def unreachable(runner: RunContext, user: User, exc: ByodError) -> None:
    """The instance could not be reached: its status ``error`` and the notifier told."""
    runner.directory.set_status(user.id, "error", error=exc.message)
    safe_notify(runner.notify, Notice("unreachable", user.id, user.clerk_id, exc.message))


def step_fields(
    runner: RunContext,
    user: User,
    step: Step,
    *,
    attempt: int,
    outcome: str,
    seconds: float | None = None,
    error: ByodError | None = None,
) -> dict[str, object]:
    """The event fields of one step's log record (``--log-format json``)."""
    return fields(
        run_id=runner.run_id,
        user_id=user.id,
        clerk_id=user.clerk_id,
        migration=step.migration.id,
        direction=step.direction,
        attempt=attempt,
        duration_ms=None if seconds is None else round(seconds * 1000, 1),
        outcome=outcome,
        error=None if error is None else type(error).__name__,
    )
