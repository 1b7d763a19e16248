"""Running one user: lease, unseal, connect, reconcile, run the chain, record.

The instance's stamp is the truth about what is applied; the ledger and the config's
``schema_version`` follow it. Each step runs in one instance transaction together with
its stamp write, then is recorded in one control-plane transaction, so a crash between
the two never applies a step twice: the next run finds it in the stamp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import sqlalchemy as sa

from byod import metrics
from byod.context import Bodies
from byod.controlplane import Config, Directory, Ledger, User, record_applied_checksum
from byod.controlplane.schema import control_plane_id
from byod.credentials import Credentials, open_instance, unseal_config
from byod.errors import (
    BusyError,
    ByodError,
    ControlPlaneError,
    CredentialsError,
    DeployError,
    DriftError,
    InstanceError,
    IrreversibleError,
    NotConnectedError,
    SettingsError,
    UnreachableError,
)
from byod.gates import Gates
from byod.instance_url import InstancePolicy
from byod.logs import fields
from byod.notify import Notice, Notifier, log_notice, safe_notify
from byod.phased import Batching, PhaseBodies, run_phased
from byod.refusals import refuse_disconnected, refuse_in_progress, refuse_irreversible
from byod.registry import Direction, FunctionCalls, Migration, Plan, Registry, Step
from byod.results import RowsProgress, StepResult, UserResult, check_stamp
from byod.sources import is_alembic_history
from byod.targets import StampEntry, Target

if TYPE_CHECKING:
    from byod.crypto import Sealer

__all__ = ["Runner"]

log = logging.getLogger("byod.runner")
#: (control plane, migration, checksum) whose applied checksum this process recorded
_NOTED: set[tuple[str, str, str]] = set()
#: How often a phased step's rows done are written to the ledger while it runs.
ROWS_REPORT_SECONDS = 3.0

TargetOpener = Callable[[Credentials, float], Target]


class _Lease:
    """Whether this run's lease was already given back by its last ledger write."""

    released = False


class Runner:
    """Migrates or rolls back one user at a time; safe to share between threads.

    ``timeout`` bounds each instance transaction (a step, a backfill batch, a finalize)
    and the connect, never a whole user: a backfill of any size never times out as a
    whole. On PostgreSQL it is also set as the server's statement and lock timeout, and on
    MariaDB as ``max_statement_time``, so the server stops the work.
    """

    def __init__(
        self,
        engine: sa.Engine,
        registry: Registry,
        sealer: Sealer,
        *,
        notify: Notifier = log_notice,
        lease_seconds: float = 30.0,
        connect_timeout: float = 10.0,
        timeout: float | None = None,
        run_id: str | None = None,
        owner: str | None = None,
        opener: TargetOpener | None = None,
        policy: InstancePolicy | None = None,
        batching: Batching = Batching(),
        on_rows: Callable[[RowsProgress], None] | None = None,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.sealer = sealer
        self.directory = Directory(engine)
        self.ledger = Ledger(engine)
        self.notify = notify
        self.lease_seconds = lease_seconds
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.run_id = run_id
        self.owner = owner or f"runner-{uuid.uuid4().hex[:12]}"
        self._given_opener = opener
        self._opener: TargetOpener = opener or self._open
        #: what instance URLs may ask (checked again each time one is unsealed)
        self.policy = policy or InstancePolicy()
        #: the migrations are an Alembic history (an unadopted instance is refused)
        self._alembic = registry.source is not None and is_alembic_history(registry.source)
        self.batching = batching
        #: hears each backfill batch done (from the thread that ran it)
        self.on_rows = on_rows
        self._app: FunctionCalls | None = None
        self._app_lock = threading.Lock()
        #: the fleet's gates, read once for this runner (a fleet run has its own runner)
        self.gates = Gates(engine, registry)

    def configured(
        self,
        *,
        run_id: str | None,
        timeout: float | None,
        lease_seconds: float,
        owner: str | None = None,
        batching: Batching | None = None,
        on_rows: Callable[[RowsProgress], None] | None = None,
    ) -> Runner:
        """A runner like this one for one fleet run: its id, timeout and lease length
        (and, given them, the name its leases are held under, how backfills go and who
        hears their batches)."""
        return Runner(
            self.engine,
            self.registry,
            self.sealer,
            notify=self.notify,
            lease_seconds=lease_seconds,
            connect_timeout=self.connect_timeout,
            timeout=timeout,
            run_id=run_id,
            owner=owner or self.owner,
            opener=self._given_opener,
            policy=self.policy,
            batching=batching or self.batching,
            on_rows=on_rows or self.on_rows,
        )

    # -- public --------------------------------------------------------------------------

    def migrate(self, user_id: int, *, to_version: int | None = None) -> UserResult:
        """Bring the user's instance (by byod id) up to ``to_version`` (default: head).

        Raises only for bad input (unknown user, no config, an impossible target);
        everything that goes wrong on the way is in the result's ``error``.
        """
        user = self.prepare(user_id)
        return self.refuse_foreign_key(user) or self.migrate_user(user, to_version=to_version)

    def prepare(self, user_id: int) -> User:
        """The user, checked to be connected: :class:`UnknownUserError` or
        :class:`NotConnectedError` (bad input) before anything is touched."""
        user = self.directory.get_user(user_id)
        refuse_disconnected(user, self.directory.get_config(user.id))
        return user

    def refuse_foreign_key(self, user: User) -> UserResult | None:
        """The user's result when its credentials were sealed with another key than the
        one in use (the operator's mistake): nothing is touched, no lease, no status, no
        ledger row. None when the key is the one in use."""
        config = self.directory.get_config(user.id)
        if config.key_id == self.sealer.key_id:
            return None
        return self._gave_up(user, config.schema_version, self._foreign_key(config))

    def migrate_user(self, user: User, *, to_version: int | None = None) -> UserResult:
        """:meth:`migrate` for a user already looked up (what a fleet run calls)."""
        self.registry.plan_up(0, to_version)  # an unknown target is bad input
        return self._run(user, lambda current: self.registry.plan_up(current, to_version))

    def rollback(self, user_id: int, to_version: int) -> UserResult:
        """Run ``down`` newest first until the user's instance is at ``to_version``.

        Refuses with :class:`IrreversibleError`, before touching anything, when a step
        in the range has no ``down``.
        """
        user = self.prepare_rollback(user_id, to_version)
        return self.refuse_foreign_key(user) or self.rollback_user(user, to_version)

    def prepare_rollback(self, user_id: int, to_version: int) -> User:
        """:meth:`prepare`, and the rollback's range checked from the control plane's
        view: :class:`PlanError` or :class:`IrreversibleError` before anything is touched."""
        user = self.prepare(user_id)
        config = self.directory.get_config(user.id)
        refuse_irreversible(user, self.registry.plan_down(config.schema_version, to_version))
        return user

    def rollback_user(self, user: User, to_version: int) -> UserResult:
        """:meth:`rollback` for a user already looked up (what a fleet run calls)."""

        def plan(current: int) -> Plan:
            down = self.registry.plan_down(current, to_version)
            refuse_irreversible(user, down)
            return down

        return self._run(user, plan)

    def repair(self, user_id: int) -> list[str]:
        """Forget the dirty markers of a user's instance once an operator has undone the
        half-applied step by hand (MySQL/MariaDB); returns the steps that were marked."""
        user = self.directory.get_user(user_id)
        self.directory.claim_lease(user.id, self.owner, self.lease_seconds)
        try:
            credentials = self._unseal(self.directory.get_config(user.id))
            target = self._opener(credentials, self.connect_timeout)
            try:
                cleared = target.clear_dirty()
            finally:
                target.close()
        finally:
            self.directory.release_lease(user.id, self.owner)
        if cleared:
            log.warning("user %s: dirty markers cleared by an operator: %s", user.id, cleared)
        return cleared

    # -- one run -------------------------------------------------------------------------

    def _run(self, user: User, make_plan: Callable[[int], Plan]) -> UserResult:
        started = time.monotonic()
        result = self._run_timed(user, make_plan, started)
        return dataclasses.replace(result, seconds=time.monotonic() - started)

    def _run_timed(
        self, user: User, make_plan: Callable[[int], Plan], started: float
    ) -> UserResult:
        deadline = None if self.timeout is None else started + self.timeout
        try:
            config = self.directory.claim_lease(user.id, self.owner, self.lease_seconds)
        except BusyError as exc:
            kind = None
            try:  # what the control plane says, for the user's line
                held = self.directory.get_config(user.id)
                version, kind = held.schema_version, held.target_kind
            except ByodError:
                version = 0
            return dataclasses.replace(self._gave_up(user, version, exc), target_kind=kind)
        lease = _Lease()
        try:
            with self.directory.keep_lease(user.id, self.owner, self.lease_seconds):
                result = self._run_leased(user, config, make_plan, lease, deadline)
                return dataclasses.replace(result, target_kind=config.target_kind)
        finally:
            if not lease.released:
                try:
                    self.directory.release_lease(user.id, self.owner)
                except ControlPlaneError as exc:  # the outcome stands; the lease expires
                    log.warning("user %s: lease not given back: %s", user.id, exc.message)

    def _run_leased(
        self,
        user: User,
        config: Config,
        make_plan: Callable[[int], Plan],
        lease: _Lease,
        deadline: float | None,
    ) -> UserResult:
        if config.connection_status == "disconnected":
            return self._gave_up(
                user, config.schema_version, NotConnectedError("it is disconnected")
            )
        if config.key_id != self.sealer.key_id:
            # the operator's key, not the user's instance: its status is left alone
            return self._refused(user, config, make_plan, self._foreign_key(config))
        try:
            credentials = self._unseal(config)
        except (CredentialsError, SettingsError) as exc:  # the right key fails; URL refused
            self.directory.set_status(user.id, "error", error=exc.message)
            return self._refused(user, config, make_plan, exc)
        connect_timeout = self.connect_timeout
        if deadline is not None:
            connect_timeout = max(0.1, min(connect_timeout, deadline - time.monotonic()))
        try:
            target = self._opener(credentials, connect_timeout)
        except UnreachableError as exc:
            self._unreachable(user, exc)
            return self._refused(user, config, make_plan, exc)
        except SettingsError as exc:  # the instance is the control plane: nothing touched
            self.directory.set_status(user.id, "error", error=exc.message)
            return self._refused(user, config, make_plan, exc)
        except BusyError as exc:  # no connection slot free: the server is there, and full
            return self._refused(user, config, make_plan, exc)
        try:
            try:
                stamp = self._read_stamp(target)
                if not stamp:
                    self._refuse_unadopted(user, target)
                self._restamp_stale(stamp, target)
                current, recovered = self._reconcile(user, config, stamp)
                plan, hold = self.gates.cut(make_plan(current))
                if plan.direction == "down":  # an empty one too: it would say "nothing to do"
                    refuse_in_progress(self.registry, user, current, target)
            except (IrreversibleError, ControlPlaneError):
                raise
            except SettingsError as exc:  # the instance is the control plane: untouched
                self.directory.set_status(user.id, "error", error=exc.message)
                return self._refused(user, config, make_plan, exc)
            except ByodError as exc:
                exc.message = credentials.scrub(exc.message)
                if isinstance(exc, UnreachableError):
                    self._unreachable(user, exc)
                if isinstance(exc, InstanceError):  # unreachable, drift, dirty, timeout
                    return self._refused(user, config, make_plan, exc)
                return self._gave_up(user, config.schema_version, exc)
            result = self._execute(user, plan, target, credentials, lease, recovered)
            if hold is not None:
                log.info("user %s: stopped before %s: %s", user.id, hold.migration_id, hold.reason)
                result = dataclasses.replace(result, held=(hold.migration_id, hold.reason))
            return result
        finally:
            target.close()

    def _note_applied(self, migration: Migration) -> None:
        """Keep the checksum a migration had when it was first applied, once per
        process (the control plane keeps the first one written anywhere)."""
        key = (str(self.engine.url), migration.id, migration.checksum)
        if key in _NOTED:
            return
        record_applied_checksum(self.engine, migration)
        _NOTED.add(key)

    def _restamp_stale(self, stamp: list[StampEntry], target: Target) -> None:
        """Stamp rows an older byod recorded with the file's bytes' checksum take the
        syntax checksum at the next step, under its lock (where the target can)."""
        stale = []
        for entry in stamp:
            migration = self.registry.get(entry.id)
            if (
                migration is not None
                and entry.checksum == migration.legacy_checksum
                and migration.legacy_checksum != migration.checksum
            ):
                stale.append(migration)
        restamp = getattr(target, "restamp_later", None)
        if stale and callable(restamp):
            restamp(stale)

    def _refuse_unadopted(self, user: User, target: Target) -> None:
        """An instance without byod's stamp that Alembic manages (its ``alembic_version``
        names a revision) is refused, with the way to adopt it: running the history from
        step 1 would meet tables that exist. Asked only with an Alembic history."""
        if not self._alembic:
            return
        reader = getattr(target, "alembic_revisions", None)
        revisions = reader() if callable(reader) else None
        if revisions:
            raise DriftError(
                f"the instance is managed by Alembic (alembic_version {', '.join(revisions)}) "
                "and has no byod stamp: adopt it before it is migrated",
                hint=f"`byod adopt {user.id}` (or `byod adopt --all`) writes byod's stamp at "
                "that revision; nothing is run again",
            )

    def _read_stamp(self, target: Target) -> list[StampEntry]:
        """The instance's stamp, read where the first step will run (see
        :meth:`Target.begin`); where byod's own part of the instance is not there yet
        (a Convex app deployed before it had byod's module), the deploy step puts it
        there first."""
        try:
            return target.begin(self._deadline())
        except DeployError:
            target.prepare(self.registry.at(1))
            return target.begin(self._deadline())

    def _reconcile(
        self, user: User, config: Config, stamp: list[StampEntry]
    ) -> tuple[int, tuple[StepResult, ...]]:
        """The instance's version, with the control plane brought in line with it; and
        the steps this same fleet run applied before its runner was lost (a task
        delivered again), found done now: the run moved the user, whoever records it."""
        problems = check_stamp(self.registry, stamp)
        if problems:
            message = "; ".join(problems)
            self.directory.set_status(user.id, config.connection_status, error=message)
            raise DriftError(f"drift: {message}")
        current = stamp[-1].version if stamp else 0
        applied: set[tuple[str, Direction]] = {(entry.id, "up") for entry in stamp}
        applied |= {(m.id, "down") for m in self.registry if m.version > current}
        recovered: list[StepResult] = []
        if config.open_rows:
            settled = self.ledger.settle_orphans(user.id, applied)
            log.warning("user %s: settled %d rows left by a lost runner", user.id, len(settled))
            metrics.LEASE_TAKEOVERS.inc()
            for row in settled:
                migration = self.registry.get(row.migration_id)
                mine = row.run_id is not None and row.run_id == self.run_id
                if row.status == "completed" and mine and migration:
                    recovered.append(
                        StepResult(migration.id, migration.version, row.direction, "recovered")
                    )
        if current != config.schema_version or config.connection_status != "connected":
            if current != config.schema_version:
                log.warning(
                    "user %s: control plane said version %s, the instance's stamp says %s; "
                    "adopting the instance's",
                    user.id,
                    config.schema_version,
                    current,
                )
            self.directory.set_status(user.id, "connected", schema_version=current)
        return current, tuple(sorted(recovered, key=lambda step: step.version))

    def _execute(
        self,
        user: User,
        plan: Plan,
        target: Target,
        credentials: Credentials,
        lease: _Lease,
        recovered: tuple[StepResult, ...] = (),
    ) -> UserResult:
        from_version = plan.from_version
        if recovered:  # this run had moved the user already: count from before that
            first = recovered[0]
            from_version = first.version - 1 if first.direction == "up" else first.version
        if plan.empty:
            return UserResult(user.id, user.clerk_id, from_version, plan.from_version, recovered)
        attempt = self.ledger.record_planned(user.id, plan, self.run_id)
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
                extra=self._fields(user, step, attempt=attempt, outcome="started"),
            )
            started = time.perf_counter()
            try:
                if index == 0:
                    target.prepare(mig)  # a Convex deployment: its code deployed first
                applied, rows = self._apply(user, step, target, self._deadline())
            except ByodError as exc:
                seconds = time.perf_counter() - started
                failure = self._step_failed(user, plan, index, exc, credentials, attempt, seconds)
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
            next_attempt = self.ledger.record_completed(
                user.id,
                step,
                start_next=None if last else plan.steps[index + 1],
                release_owner=self.owner if last else None,
            )
            lease.released = last
            if step.direction == "up":
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
                extra=self._fields(user, step, attempt=attempt, seconds=seconds, outcome=status),
            )
            metrics.STEPS.labels(mig.id, step.direction, target.kind, status).inc()
            metrics.STEP_SECONDS.labels(mig.id, target.kind).observe(seconds)
            results.append(
                StepResult(mig.id, mig.version, step.direction, status, seconds, rows=rows)
            )
            attempt = next_attempt or 0
        done = UserResult(user.id, user.clerk_id, from_version, version, tuple(results))
        try:
            target.finish(self.registry.at(version), version == self.registry.head)
        except ByodError as exc:  # the steps stand; the code left running is not the one
            message = credentials.scrub(exc.message)
            log.error("user %s: at version %s, but %s", user.id, version, message)
            undeployed = type(exc)(
                f"user {user.id} ({user.clerk_id}): at version {version}, but the app code "
                f"of that version did not deploy: {message}",
                hint=exc.hint,
            )
            self.directory.set_status(user.id, "connected", error=undeployed.message)
            return dataclasses.replace(done, error=undeployed)
        return done

    def _step_failed(
        self,
        user: User,
        plan: Plan,
        index: int,
        exc: ByodError,
        credentials: Credentials,
        attempt: int,
        seconds: float,
    ) -> UserResult:
        """Step ``index`` of the plan failed (its instance transaction rolled back): the
        ledger says so (later steps ``skipped``), and the user's result names the step;
        its ``steps`` are the failed one and the skipped ones."""
        step = plan.steps[index]
        mig, later = step.migration, plan.steps[index + 1 :]
        text = credentials.scrub(f"{type(exc).__name__}: {exc.message}")
        self.ledger.record_failed(user.id, step, text)
        self.ledger.record_skipped(user.id, later, f"skipped: {mig.id} {step.direction} failed")
        log.error(
            "user %s: %s %s failed (attempt %d) after %.3fs: %s",
            user.id,
            mig.id,
            step.direction,
            attempt,
            seconds,
            text,
            extra=self._fields(
                user, step, attempt=attempt, seconds=seconds, outcome="failed", error=exc
            ),
        )
        if isinstance(exc, UnreachableError):
            self._unreachable(user, exc)
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

    def _deadline(self) -> float | None:
        """One instance transaction's deadline: ``--timeout`` bounds each transaction (a
        step, a backfill batch, a finalize) and each connect, never a whole user."""
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _apply(
        self,
        user: User,
        step: Step,
        target: Target,
        deadline: float | None,
        *,
        record: bool = True,
    ) -> tuple[bool, int | None]:
        """One step: in one transaction, or phased (backfills), each phase bounded on its
        own by the timeout. Whether it was applied now, and a phased step's rows."""
        bodies = Bodies(self.engine, user, target.kind, app=self._app_deployment())
        migration = step.migration
        if step.direction == "down":
            if target.kind != "convex" or not migration.reverse_backfills:
                return target.apply(step, bodies.step(step), deadline), None
            # undo pages first, then down (with the stamp), as the finalize would end it
            phases = PhaseBodies(
                schema=lambda conn: None,
                batch=lambda index: bodies.batch(step, index),
                finalize=bodies.step(step),
            )
        elif not migration.phased:
            return target.apply(step, bodies.step(step), deadline), None
        else:
            finalize = migration.finalize
            phases = PhaseBodies(
                schema=bodies.step(step),
                batch=lambda index: bodies.batch(step, index),
                finalize=bodies.step(step, finalize) if finalize else (lambda conn: None),
            )
        reported = [time.monotonic()]
        latest: list[tuple[int, int | None] | None] = [None]  # rows done, estimated total

        counted = metrics.BACKFILL_ROWS.labels(migration.id, target.kind)

        def on_rows(rows: int, total: int | None) -> None:  # the ledger every few seconds
            # the first call says where the step starts (or resumes): nothing done yet
            done_before = latest[0][0] if latest[0] is not None else rows
            counted.inc(max(0, rows - done_before))
            latest[0] = (rows, total)
            if self.on_rows is not None:
                self.on_rows(RowsProgress(user.id, migration.id, rows, total))
            if record and time.monotonic() - reported[0] >= ROWS_REPORT_SECONDS:
                self.ledger.record_rows(user.id, step, rows, total)
                reported[0] = time.monotonic()

        pages: list[str] = []

        def on_pages(summary: str) -> None:  # a page hit the instance's transaction limit
            pages.append(summary)
            if record:
                with contextlib.suppress(ControlPlaneError):  # the step's outcome comes first
                    self.ledger.record_page_sizes(user.id, step, "; ".join(pages))

        try:
            rows = run_phased(
                target,
                step,
                phases,
                timeout=self.timeout,
                batching=self.batching,
                user_id=user.id,
                on_rows=on_rows,
                on_pages=on_pages,
                log_fields=fields(
                    run_id=self.run_id,
                    user_id=user.id,
                    clerk_id=user.clerk_id,
                    migration=step.migration.id,
                    direction=step.direction,
                ),
            )
        except ByodError:
            if record and latest[0] is not None:  # a failed or stopped attempt shows it
                with contextlib.suppress(ControlPlaneError):  # the step's error comes first
                    self.ledger.record_rows(user.id, step, *latest[0])
            raise
        if rows is None:
            return False, None
        if record:
            self.ledger.record_rows(user.id, step, rows, latest[0][1] if latest[0] else None)
        return True, rows

    # -- helpers -------------------------------------------------------------------------

    def _app_deployment(self) -> FunctionCalls | None:
        """``ctx.app``: the app's own Convex deployment, where the operator configured one
        (one client for this runner, made on first use)."""
        policy = self.policy
        if policy.app_convex_url is None or policy.app_convex_key is None:
            return None
        with self._app_lock:
            if self._app is None:
                from byod.targets.convex import DeploymentCalls
                from byod.targets.convex_client import ConvexClient

                client = ConvexClient(
                    policy.app_convex_url, policy.app_convex_key, ssl_ca=policy.ssl_ca
                )
                self._app = DeploymentCalls(client)
            return self._app

    def _open(self, credentials: Credentials, timeout: float) -> Target:
        """The default opener: a Convex deployment's lock lasts as long as a lease."""
        return open_instance(credentials, timeout=timeout, hold_seconds=self.lease_seconds)

    def _unseal(self, config: Config) -> Credentials:
        """A config's credentials, checked against the instance URL policy."""
        return unseal_config(
            config, self.sealer, policy=self.policy, control_plane=control_plane_id(self.engine)
        )

    def _refused(
        self, user: User, config: Config, make_plan: Callable[[int], Plan], exc: ByodError
    ) -> UserResult:
        """Give up before the chain started, leaving a trail where operators look: a
        ``failed`` ledger row, error class first, for the step the control plane expects
        to run next (none when it expects nothing to run)."""
        try:
            steps = make_plan(config.schema_version).steps
        except ByodError:
            steps = ()
        if not steps:
            return self._gave_up(user, config.schema_version, exc)
        step, text = steps[0], f"{type(exc).__name__}: {exc.message}"
        self.ledger.record_not_started(user.id, step, text, self.run_id)
        failed = StepResult(step.migration.id, step.migration.version, step.direction, "failed")
        return self._gave_up(user, config.schema_version, exc, steps=(failed,))

    def _foreign_key(self, config: Config) -> CredentialsError:
        return CredentialsError(
            f"its credentials were sealed with key {config.key_id}, but the configured key "
            f"is {self.sealer.key_id}: wrong encryption key; nothing was changed"
        )

    def _gave_up(
        self, user: User, version: int, exc: ByodError, *, steps: tuple[StepResult, ...] = ()
    ) -> UserResult:
        first = steps[0] if steps else None
        log.error(
            "user %s: %s: %s",
            user.id,
            type(exc).__name__,
            exc.message,
            extra=fields(
                run_id=self.run_id,
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

    def _fields(
        self,
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
            run_id=self.run_id,
            user_id=user.id,
            clerk_id=user.clerk_id,
            migration=step.migration.id,
            direction=step.direction,
            attempt=attempt,
            duration_ms=None if seconds is None else round(seconds * 1000, 1),
            outcome=outcome,
            error=None if error is None else type(error).__name__,
        )

    def _unreachable(self, user: User, exc: ByodError) -> None:
        self.directory.set_status(user.id, "error", error=exc.message)
        safe_notify(self.notify, Notice("unreachable", user.id, user.clerk_id, exc.message))
