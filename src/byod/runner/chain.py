"""The chain: one user's plan run step by step on its instance, each step recorded.

Each step runs in one instance transaction together with its stamp write (or phased,
see :mod:`byod.runner.step`), then is recorded in one control-plane write that also
moves the config's version, starts the next step's row and, after the last step, gives
the lease back. A crash between the two never applies a step twice: the next run finds
the step in the stamp. The first step that fails stops the chain: its row ``failed``
with the error, the later ones ``skipped``. At the end the code of the version reached is
deployed (a Convex deployment); the steps stand when it does not.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from byod import metrics
from byod.clock import utcnow
from byod.controlplane import record_applied_checksum
from byod.credentials import Credentials
from byod.errors import ByodError, UnreachableError
from byod.registry import Migration, Plan
from byod.results import StepResult, UserResult
from byod.runner.pages import Claimed, plan_key
from byod.runner.step import apply_step
from byod.runner.trail import step_fields, unreachable
from byod.targets import Target

if TYPE_CHECKING:
    from byod.controlplane import User
    from byod.runner.context import RunContext

__all__ = ["Chain", "Lease"]

log = logging.getLogger("byod.runner")
#: (control plane, migration, checksum) whose applied checksum this process recorded
_NOTED: set[tuple[str, str, str]] = set()


class Lease:
    """The user's lease in this run: whether its last ledger write gave it back already,
    and what the run claimed and wrote for the user with its page (None: nothing)."""

    def __init__(self, claimed: Claimed | None = None) -> None:
        self.claimed = claimed
        self.released = False


class Chain:
    """Runs one user's plan on its open instance: :meth:`run` once."""

    def __init__(
        self,
        runner: RunContext,
        user: User,
        plan: Plan,
        target: Target,
        credentials: Credentials,
        lease: Lease,
    ) -> None:
        self.runner = runner
        self.user = user
        self.plan = plan
        self.target = target
        self.credentials = credentials
        self.lease = lease

    def run(self, recovered: tuple[StepResult, ...] = ()) -> UserResult:
        """Every step of the plan in order, until one fails; ``recovered``: the steps
        this same run applied before its runner was lost, reported first."""
        runner, user, plan, target = self.runner, self.user, self.plan, self.target
        from_version = plan.from_version
        if recovered:  # this run had moved the user already: count from before that
            first = recovered[0]
            from_version = first.version - 1 if first.direction == "up" else first.version
        if plan.empty:
            return UserResult(user.id, user.clerk_id, from_version, plan.from_version, recovered)
        attempt = self._planned()
        results: list[StepResult] = list(recovered)
        version = plan.from_version
        for index, step in enumerate(plan.steps):
            mig = step.migration
            log.info(
                "user %s: %s %s started (attempt %d)",
                user.id,
                mig.id,
                step.direction,
                attempt,
                extra=step_fields(runner, user, step, attempt=attempt, outcome="started"),
            )
            started, began = time.perf_counter(), utcnow()
            try:
                if index == 0:
                    target.prepare(mig)  # a Convex deployment: its code deployed first
                applied, rows = apply_step(runner, user, step, target, runner.deadline())
            except ByodError as exc:
                seconds = time.perf_counter() - started
                failure = self._step_failed(index, exc, attempt, seconds)
                for failed in failure.steps:
                    outcome = metrics.STEPS.labels(
                        failed.migration_id, failed.direction, target.kind, failed.status
                    )
                    outcome.inc()
                metrics.STEP_SECONDS.labels(mig.id, target.kind).observe(seconds)
                results.extend(failure.steps)
                return dataclasses.replace(
                    failure, from_version=from_version, to_version=version, steps=tuple(results)
                )
            seconds = time.perf_counter() - started
            last = index == len(plan.steps) - 1
            if last and runner.outcomes is not None:  # recorded with the next batch
                runner.outcomes.add(user.id, step, runner.owner, began)
                next_attempt = None
            else:
                next_attempt = runner.ledger.record_completed(
                    user.id,
                    step,
                    start_next=None if last else plan.steps[index + 1],
                    release_owner=runner.owner if last else None,
                    started_at=began,
                )
            self.lease.released = last
            if step.direction == "up" and runner.outcomes is not None:
                runner.outcomes.note_applied(step.migration)  # with the next batch
            elif step.direction == "up":
                self._note_applied(step.migration)
            version = step.version_after
            status = "completed" if applied else "already-applied"
            log.info(
                "user %s: %s %s %s (attempt %d) in %.3fs",
                user.id,
                mig.id,
                step.direction,
                status,
                attempt,
                seconds,
                extra=step_fields(
                    runner, user, step, attempt=attempt, seconds=seconds, outcome=status
                ),
            )
            metrics.STEPS.labels(mig.id, step.direction, target.kind, status).inc()
            metrics.STEP_SECONDS.labels(mig.id, target.kind).observe(seconds)
            results.append(
                StepResult(mig.id, mig.version, step.direction, status, seconds, rows=rows)
            )
            attempt = next_attempt or 0
        done = UserResult(user.id, user.clerk_id, from_version, version, tuple(results))
        return self._deploy_reached(done, version)

    def _planned(self) -> int:
        """The plan's rows written (the first step ``running``): by the run's page
        already when it wrote this very plan, else now. The first step's attempt."""
        claimed, runner = self.lease.claimed, self.runner
        if claimed is not None and claimed.planned:
            if claimed.planned == plan_key(self.plan):
                claimed.used = True
                return claimed.attempt
            # the instance is not where the control plane said: that plan never ran
            runner.ledger.drop_planned([self.user.id], runner.run_id)
            claimed.planned = ()
        return runner.ledger.record_planned(self.user.id, self.plan, runner.run_id)

    def _deploy_reached(self, done: UserResult, version: int) -> UserResult:
        """The code of the version reached deployed; the steps stand when it does not."""
        runner, user = self.runner, self.user
        try:
            self.target.finish(runner.registry.at(version), version == runner.registry.head)
        except ByodError as exc:  # the steps stand; the code left running is not the one
            message = self.credentials.scrub(exc.message)
            log.error("user %s: at version %s, but %s", user.id, version, message)
            undeployed = type(exc)(
                f"user {user.id} ({user.clerk_id}): at version {version}, but the app code "
                f"of that version did not deploy: {message}",
                hint=exc.hint,
            )
            if runner.outcomes is not None:  # the version's record first, then the error
                runner.outcomes.flush()
            runner.directory.set_status(user.id, "connected", error=undeployed.message)
            return dataclasses.replace(done, error=undeployed)
        return done

    def _step_failed(self, index: int, exc: ByodError, attempt: int, seconds: float) -> UserResult:
        """Step ``index`` of the plan failed (its instance transaction rolled back): the
        ledger says so (later steps ``skipped``), and the user's result names the step;
        its ``steps`` are the failed one and the skipped ones."""
        runner, user, credentials = self.runner, self.user, self.credentials
        step = self.plan.steps[index]
        mig, later = step.migration, self.plan.steps[index + 1 :]
        text = credentials.scrub(f"{type(exc).__name__}: {exc.message}")
        runner.ledger.record_failed(user.id, step, text)
        runner.ledger.record_skipped(user.id, later, f"skipped: {mig.id} {step.direction} failed")
        log.error(
            "user %s: %s %s failed (attempt %d) after %.3fs: %s",
            user.id,
            mig.id,
            step.direction,
            attempt,
            seconds,
            text,
            extra=step_fields(
                runner, user, step, attempt=attempt, seconds=seconds, outcome="failed", error=exc
            ),
        )
        if isinstance(exc, UnreachableError):
            unreachable(runner, user, exc)
        steps = [StepResult(mig.id, mig.version, step.direction, "failed", seconds, text)]
        steps += [
            StepResult(s.migration.id, s.migration.version, s.direction, "skipped") for s in later
        ]
        failure = type(exc)(
            f"user {user.id} ({user.clerk_id}): {mig.id} {step.direction} failed: "
            + credentials.scrub(exc.message),
            hint=exc.hint,
        )
        return UserResult(user.id, user.clerk_id, 0, 0, tuple(steps), failure)

    def _note_applied(self, migration: Migration) -> None:
        """Keep the checksum a migration had when it was first applied, once per
        process (the control plane keeps the first one written anywhere)."""
        engine = self.runner.engine
        key = (str(engine.url), migration.id, migration.checksum)
        if key in _NOTED:
            return
        record_applied_checksum(engine, migration)
        _NOTED.add(key)
