"""Rehearsals: a user's pending steps run as a real run would apply them, inside one
instance transaction that is rolled back (see :meth:`byod.targets.base.Target.rehearse`);
nothing is committed in the instance, nothing written to the ledger or the config."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import TYPE_CHECKING

from byod.errors import BusyError, ByodError, ControlPlaneError, DriftError, RehearsalError
from byod.results import StepResult, UserResult, check_stamp
from byod.runner.step import apply_step
from byod.runner.trail import gave_up

if TYPE_CHECKING:
    from byod.controlplane import User
    from byod.runner import Runner
    from byod.targets import Target

__all__ = ["rehearse_user"]


def rehearse_user(runner: Runner, user: User, *, to_version: int | None = None) -> UserResult:
    """Rehearse the user's pending steps (schema changes, every backfill batch,
    finalizes) in one instance transaction under the user's lease, then roll it all
    back: nothing is committed in the instance, the ledger and the user's config are
    untouched. The result's steps are ``rehearsed`` (or the one that ``failed``, and
    ``skipped`` after it); its ``error`` says why. :class:`RehearsalError` (nothing
    touched) for an instance that cannot roll its DDL back."""
    runner.registry.plan_up(0, to_version)  # an unknown target is bad input
    started = time.monotonic()
    try:
        config = runner.directory.claim_lease(user.id, runner.owner, runner.lease_seconds)
    except BusyError as exc:
        return dataclasses.replace(gave_up(runner, user, 0, exc), rehearsal=True)
    try:
        with runner.directory.keep_lease(user.id, runner.owner, runner.lease_seconds):
            credentials = runner.unseal(config)
            with runner.connect(credentials) as target:
                result = _rehearse_on(runner, user, target, to_version, started)
    except RehearsalError:
        raise
    except ByodError as exc:
        return dataclasses.replace(
            gave_up(runner, user, config.schema_version, exc), rehearsal=True
        )
    finally:
        with contextlib.suppress(ControlPlaneError):
            runner.directory.release_lease(user.id, runner.owner)
    return dataclasses.replace(result, target_kind=config.target_kind)


def _rehearse_on(
    runner: Runner, user: User, target: Target, to_version: int | None, started: float
) -> UserResult:
    stamp = target.rehearse(runner.deadline())
    problems = check_stamp(runner.registry, stamp)
    if problems:
        raise DriftError(f"drift: {'; '.join(problems)}")
    current = stamp[-1].version if stamp else 0
    plan = runner.registry.plan_up(current, to_version)
    steps: list[StepResult] = []
    for index, step in enumerate(plan.steps):
        mig, began = step.migration, time.perf_counter()
        try:
            if index == 0:
                target.prepare(mig)
            _, rows = apply_step(runner, user, step, target, runner.deadline(), record=False)
        except ByodError as exc:
            seconds = time.perf_counter() - began
            text = f"{type(exc).__name__}: {exc.message}"
            steps.append(StepResult(mig.id, mig.version, "up", "failed", seconds, text))
            steps += [
                StepResult(s.migration.id, s.migration.version, "up", "skipped")
                for s in plan.steps[index + 1 :]
            ]
            failure = type(exc)(
                f"user {user.id} ({user.clerk_id}): rehearsing {mig.id}: {exc.message}",
                hint=exc.hint,
            )
            return UserResult(
                user.id, user.clerk_id, current, current, tuple(steps), failure, rehearsal=True
            )
        seconds = time.perf_counter() - began
        steps.append(StepResult(mig.id, mig.version, "up", "rehearsed", seconds, rows=rows))
    elapsed = time.monotonic() - started
    target_version = plan.steps[-1].version_after if plan.steps else current
    return UserResult(
        user.id,
        user.clerk_id,
        current,
        target_version,
        tuple(steps),
        seconds=elapsed,
        rehearsal=True,
    )
