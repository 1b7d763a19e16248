"""The runner: one user at a time, its parts put in order.

A user's run is: claim its lease (kept alive while the run lasts), unseal its
credentials, connect to its instance, read and reconcile its stamp
(:mod:`byod.runner.reconcile`), cut the plan at the fleet's gates, run the chain
(:mod:`byod.runner.chain`, each step by :mod:`byod.runner.step`), give the lease back.
Whatever stops it before the chain started leaves its trail (:mod:`byod.runner.trail`).
The instance's stamp is the truth about what is applied; the ledger and the config's
``schema_version`` follow it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import sqlalchemy as sa

from byod.controlplane import Config, Directory, Ledger, User
from byod.controlplane.schema import control_plane_id
from byod.credentials import Credentials, open_instance, unseal_config
from byod.errors import (
    BusyError,
    ByodError,
    ControlPlaneError,
    CredentialsError,
    InstanceError,
    IrreversibleError,
    NotConnectedError,
    SettingsError,
    UnreachableError,
)
from byod.gates import Gates
from byod.instance_url import InstancePolicy
from byod.notify import Notifier, log_notice
from byod.phased import Batching
from byod.refusals import refuse_disconnected, refuse_in_progress, refuse_irreversible
from byod.registry import FunctionCalls, Plan, Registry
from byod.results import RowsProgress, UserResult
from byod.runner.chain import Chain, Lease
from byod.runner.pages import Claims, Outcomes
from byod.runner.reconcile import read_stamp, reconcile, refuse_unadopted, restamp_stale
from byod.runner.trail import foreign_key, gave_up, refused, unreachable
from byod.sources import is_alembic_history
from byod.targets import Target

if TYPE_CHECKING:
    from byod.crypto import Sealer

__all__ = ["Runner", "TargetOpener"]

log = logging.getLogger("byod.runner")

TargetOpener = Callable[[Credentials, float], Target]


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
        self.alembic = registry.source is not None and is_alembic_history(registry.source)
        self.batching = batching
        #: hears each backfill batch done (from the thread that ran it)
        self.on_rows = on_rows
        self._app: FunctionCalls | None = None
        self._app_lock = threading.Lock()
        #: the fleet's gates, read once for this runner (a fleet run has its own runner)
        self.gates = Gates(engine, registry)
        #: a fleet run's users claimed a page at a time (None: each user claims its own)
        self.claims: Claims | None = None
        #: where a fleet run's last steps wait to be recorded in batches (None: at once)
        self.outcomes: Outcomes | None = None

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
        return gave_up(self, user, config.schema_version, foreign_key(self, config))

    def migrate_user(self, user: User, *, to_version: int | None = None) -> UserResult:
        """:meth:`migrate` for a user already looked up (what a fleet run calls)."""
        self.registry.plan_up(0, to_version)  # an unknown target is bad input
        return self._run(user, lambda current: self.plan_for("migrate", user, current, to_version))

    def plan_for(self, action: str, user: User, current: int, to_version: int | None) -> Plan:
        """The steps a run of ``action`` (``migrate`` or ``rollback``) takes the user
        through from version ``current``, before the fleet's gates: up to ``to_version``
        (default head), or down to it. :class:`IrreversibleError` for a rollback through
        a step with no ``down``; :class:`PlanError` for an impossible target."""
        if action != "rollback":
            return self.registry.plan_up(current, to_version)
        down = self.registry.plan_down(current, to_version or 0)
        refuse_irreversible(user, down)
        return down

    def page_plan(
        self, action: str, user: User, config: Config, to_version: int | None
    ) -> Plan | None:
        """The plan written for a user of a claimed page: what its run would do at the
        control plane's version, as far as the fleet's gates let it; None when it will
        not run a chain (disconnected, sealed with another key, a rollback that cannot be
        undone): its run then says why, with no plan written."""
        if config.connection_status == "disconnected" or config.key_id != self.sealer.key_id:
            return None
        try:
            plan = self.plan_for(action, user, config.schema_version, to_version)
            return self.gates.cut(plan)[0]
        except ByodError:
            return None

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
        return self._run(user, lambda current: self.plan_for("rollback", user, current, to_version))

    def repair(self, user_id: int) -> list[str]:
        """Forget the dirty markers of a user's instance once an operator has undone the
        half-applied step by hand (MySQL/MariaDB); returns the steps that were marked."""
        user = self.directory.get_user(user_id)
        self.directory.claim_lease(user.id, self.owner, self.lease_seconds)
        try:
            credentials = self.unseal(self.directory.get_config(user.id))
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
        claimed = None if self.claims is None else self.claims.take(user.id)
        if claimed is not None:  # claimed with its page, its plan written with it
            config = claimed.config
        else:
            try:
                config = self.directory.claim_lease(user.id, self.owner, self.lease_seconds)
            except BusyError as exc:
                kind = None
                try:  # what the control plane says, for the user's line
                    held = self.directory.get_config(user.id)
                    version, kind = held.schema_version, held.target_kind
                except ByodError:
                    version = 0
                return dataclasses.replace(gave_up(self, user, version, exc), target_kind=kind)
        lease = Lease(claimed)
        try:
            with self.directory.keep_lease(user.id, self.owner, self.lease_seconds):
                result = self._run_leased(user, config, make_plan, lease, deadline)
                return dataclasses.replace(result, target_kind=config.target_kind)
        finally:
            self._let_go(user, lease)

    def _let_go(self, user: User, lease: Lease) -> None:
        """The user's run is over: a plan written with its page that its chain did not
        run is forgotten (nothing ran), and the lease given back unless the last step's
        record does that."""
        try:
            claimed = lease.claimed
            if claimed is not None and claimed.planned and not claimed.used:
                self.ledger.drop_planned([user.id], self.run_id)
            if not lease.released:
                self.directory.release_lease(user.id, self.owner)
        except ControlPlaneError as exc:  # the outcome stands; the lease expires
            log.warning("user %s: lease not given back: %s", user.id, exc.message)

    def _run_leased(
        self,
        user: User,
        config: Config,
        make_plan: Callable[[int], Plan],
        lease: Lease,
        deadline: float | None,
    ) -> UserResult:
        if config.connection_status == "disconnected":
            return gave_up(
                self, user, config.schema_version, NotConnectedError("it is disconnected")
            )
        if config.key_id != self.sealer.key_id:
            # the operator's key, not the user's instance: its status is left alone
            return refused(self, user, config, make_plan, foreign_key(self, config))
        try:
            credentials = self.unseal(config)
        except (CredentialsError, SettingsError) as exc:  # the right key fails; URL refused
            self.directory.set_status(user.id, "error", error=exc.message)
            return refused(self, user, config, make_plan, exc)
        connect_timeout = self.connect_timeout
        if deadline is not None:
            connect_timeout = max(0.1, min(connect_timeout, deadline - time.monotonic()))
        try:
            target = self._opener(credentials, connect_timeout)
        except UnreachableError as exc:
            unreachable(self, user, exc)
            return refused(self, user, config, make_plan, exc)
        except SettingsError as exc:  # the instance is the control plane: nothing touched
            self.directory.set_status(user.id, "error", error=exc.message)
            return refused(self, user, config, make_plan, exc)
        except BusyError as exc:  # no connection slot free: the server is there, and full
            return refused(self, user, config, make_plan, exc)
        try:
            try:
                stamp = read_stamp(self, target)
                if not stamp:
                    refuse_unadopted(self, user, target)
                restamp_stale(self.registry, stamp, target)
                current, recovered = reconcile(self, user, config, stamp)
                plan, hold = self.gates.cut(make_plan(current))
                if plan.direction == "down":  # an empty one too: it would say "nothing to do"
                    refuse_in_progress(self.registry, user, current, target)
            except (IrreversibleError, ControlPlaneError):
                raise
            except SettingsError as exc:  # the instance is the control plane: untouched
                self.directory.set_status(user.id, "error", error=exc.message)
                return refused(self, user, config, make_plan, exc)
            except ByodError as exc:
                exc.message = credentials.scrub(exc.message)
                if isinstance(exc, UnreachableError):
                    unreachable(self, user, exc)
                if isinstance(exc, InstanceError):  # unreachable, drift, dirty, timeout
                    return refused(self, user, config, make_plan, exc)
                return gave_up(self, user, config.schema_version, exc)
            result = Chain(self, user, plan, target, credentials, lease).run(recovered)
            if hold is not None:
                log.info("user %s: stopped before %s: %s", user.id, hold.migration_id, hold.reason)
                result = dataclasses.replace(result, held=(hold.migration_id, hold.reason))
            return result
        finally:
            target.close()

    # -- what the chain, a rehearsal and an adoption share ---------------------------------

    def deadline(self) -> float | None:
        """One instance transaction's deadline: ``--timeout`` bounds each transaction (a
        step, a backfill batch, a finalize) and each connect, never a whole user."""
        return None if self.timeout is None else time.monotonic() + self.timeout

    def connect(self, credentials: Credentials, timeout: float | None = None) -> Target:
        """The user's instance, opened (``timeout``: the connect's, default the runner's)."""
        return self._opener(credentials, self.connect_timeout if timeout is None else timeout)

    def app_deployment(self) -> FunctionCalls | None:
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

    def unseal(self, config: Config) -> Credentials:
        """A config's credentials, checked against the instance URL policy."""
        return unseal_config(
            config, self.sealer, policy=self.policy, control_plane=control_plane_id(self.engine)
        )
