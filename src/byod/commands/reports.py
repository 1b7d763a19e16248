"""Reading without changing: the fleet, one user's instance, history and pending
migrations, runs, and verification against each instance's stamp."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from byod.clock import utcnow
from byod.controlplane import (
    Config,
    FleetStatus,
    LedgerRow,
    RunRecord,
    RunStore,
    User,
    fleet_status,
    history,
)
from byod.controlplane.gates import gate_views
from byod.controlplane.rehearsals import rehearsal_failures, rehearsal_timeline
from byod.controlplane.run_history import StepCount, step_counts, users_finished_at, versions_at
from byod.controlplane.schema import control_plane_id
from byod.errors import ByodError, SettingsError
from byod.results import check_stamp
from byod.targets.base import UNDO_SUFFIX

if TYPE_CHECKING:
    from byod.registry import Migration
    from byod.workspace import Workspace


def status(ws: Workspace) -> FleetStatus:
    """The fleet at a glance (no instance is contacted)."""
    ws.require_tables()
    found = fleet_status(ws.engine, ws.registry.head)
    return dataclasses.replace(found, gates=gate_views(ws.engine, ws.registry))


def list_runs(ws: Workspace, *, limit: int = 20, noop: bool = False) -> list[RunRecord]:
    """The newest fleet runs (``noop``: runs that moved nobody too)."""
    ws.require_tables()
    return RunStore(ws.engine).recent(limit, noop=noop)


@dataclass(frozen=True)
class RunDetails:
    """One run with its failures, and the rows its backfills have done."""

    run: RunRecord
    failures: list[tuple[int, str, str, str | None]]
    rows_done: int = 0
    #: the estimated total of the rows of the users the run has reached
    rows_total: int = 0


def runs_rows(ws: Workspace, runs: list[RunRecord]) -> dict[str, tuple[int, int]]:
    """Rows the runs' backfills have done, and their estimated total, by run id (runs
    without backfills are left out)."""
    return RunStore(ws.engine).rows_by_run([run.id for run in runs])


def show_run(ws: Workspace, run_id: str) -> RunDetails:
    """One fleet run and the steps that failed in it."""
    ws.require_tables()
    store = RunStore(ws.engine)
    run = store.get(run_id)
    if run.kind == "rehearse":  # its users' outcomes are kept apart from the ledger
        return RunDetails(run, rehearsal_failures(ws.engine, run_id))
    return RunDetails(run, store.failures(run_id), *store.rows_done(run_id))


@dataclass(frozen=True)
class RunTimeline:
    """A run for its own page: its details, when each of its users finished, and its
    ledger rows counted by step and status."""

    details: RunDetails
    finished_at: list[datetime]
    steps: list[StepCount]


def run_timeline(ws: Workspace, run_id: str) -> RunTimeline:
    """One run with its timeline (:class:`InputError` for an unknown run id)."""
    details = show_run(ws, run_id)
    if details.run.kind == "rehearse":
        finished, counted = rehearsal_timeline(ws.engine, run_id)
        steps = [StepCount(m, "up", status, n) for (m, status), n in sorted(counted.items())]
        return RunTimeline(details, finished, steps)
    return RunTimeline(
        details, users_finished_at(ws.engine, run_id), step_counts(ws.engine, run_id)
    )


def fleet_over_runs(ws: Workspace, runs: list[RunRecord]) -> list[dict[int, int]]:
    """Users per schema version at the end of each run (now, for one still running)."""
    now = utcnow()
    return versions_at(ws.engine, [run.ended_at or now for run in runs])


def user_history(
    ws: Workspace, user_ref: str, *, limit: int | None = None, offset: int = 0
) -> tuple[User, list[LedgerRow]]:
    """A user's ledger rows (``USER`` by the one rule), newest first."""
    user = ws.directory.find_user(user_ref)
    return user, history_of(ws, user.id, limit=limit, offset=offset)


def history_of(
    ws: Workspace, user_id: int, *, limit: int | None = None, offset: int = 0
) -> list[LedgerRow]:
    """The ledger rows of the user with this byod id, newest first."""
    ws.require_tables()
    return history(ws.engine, user_id, limit=limit, offset=offset)


def list_users(ws: Workspace, *, removed: bool = False) -> list[User]:
    """Every user, by id (``removed``: removed users too)."""
    return ws.directory.list_users(removed=removed)


def caller(ws: Workspace, clerk_id: str) -> User:
    """The user a token's subject names: its clerk id, byte for byte (never a byod id,
    never trimmed or normalised); :class:`UnknownUserError` when none does."""
    return ws.directory.get_user_by_clerk_id(clerk_id)


@dataclass(frozen=True)
class InstanceView:
    """Where one user's database stands, from the control plane's view."""

    user: User
    config: Config
    head: int
    pending: int


def instance(ws: Workspace, user: User) -> InstanceView:
    """The user's database as the control plane records it (:class:`NotConnectedError`
    when none is connected)."""
    config = ws.directory.get_config(user.id)
    head = ws.registry.head
    return InstanceView(user, config, head, ws.registry.pending_count(config.schema_version))


def instance_busy(ws: Workspace, user_id: int) -> bool:
    """Whether a runner holds the user's lease now (a run is under way for it)."""
    config = ws.directory.get_config(user_id)
    expires = config.lease_expires_at
    return bool(config.lease_owner and expires and expires > utcnow())


def pending_migrations(ws: Workspace, user: User) -> list[Migration]:
    """The migrations the user's database still needs, oldest first."""
    config = ws.directory.get_config(user.id)
    from byod.commands.runs import refuse_user_ahead  # the fleet, only where it is needed

    refuse_user_ahead(ws, user, config.schema_version)
    return ws.registry.after(config.schema_version)


def get_run(ws: Workspace, run_id: str) -> RunRecord:
    """One fleet run (:class:`InputError` when there is none with that id)."""
    ws.require_tables()
    return RunStore(ws.engine).get(run_id)


def pending(ws: Workspace, user_ref: str) -> int:
    """How many migrations the user's instance still needs (control plane's view)."""
    user = ws.directory.find_user(user_ref)
    config = ws.directory.get_config(user.id)
    from byod.commands.runs import refuse_user_ahead  # the fleet, only where it is needed

    refuse_user_ahead(ws, user, config.schema_version)
    return ws.registry.pending_count(config.schema_version)


@dataclass(frozen=True)
class VerifyReport:
    """One user's instance checked against the registry and the control plane."""

    user_id: int
    clerk_id: str
    control_version: int
    instance_version: int | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when stamp, registry and control plane agree."""
        return not self.problems


def verify(ws: Workspace, user_ref: str | None, *, policy: bool = False) -> list[VerifyReport]:
    """Compare each instance's stamp with the registry's checksums and the control plane
    (every configured user when ``user_ref`` is None). ``policy``: only whether today's
    instance policy still allows each stored config (its URL and its host's addresses),
    without connecting: what an operator checks after tightening the policy."""
    directory = ws.directory
    if user_ref is not None:
        users = [directory.find_user(user_ref)]
    else:
        users = [directory.get_user(user_id) for user_id in directory.configured_user_ids()]
    check = _policy_one if policy else _verify_one
    return [check(ws, user) for user in users]


def _policy_one(ws: Workspace, user: User) -> VerifyReport:
    from byod.credentials import checked_address, unseal_config  # not for status or history

    config = ws.directory.get_config(user.id)
    problems: tuple[str, ...] = ()
    try:
        credentials = unseal_config(config, ws.sealer, policy=ws.settings.instance_policy)
        checked_address(credentials)
    except SettingsError as exc:
        problems = (f"refused by the instance policy: {exc.message}",)
    except ByodError:
        pass  # unreachable or unreadable: not the policy's concern (see byod verify)
    return VerifyReport(user.id, user.clerk_id, config.schema_version, None, problems)


def _verify_one(ws: Workspace, user: User) -> VerifyReport:
    from byod.credentials import open_instance, unseal_config  # not for status or history

    config = ws.directory.get_config(user.id)
    try:
        credentials = unseal_config(
            config,
            ws.sealer,
            policy=ws.settings.instance_policy,
            control_plane=control_plane_id(ws.engine),
        )
        with open_instance(credentials, timeout=10.0) as target:
            stamp = target.read_stamp()
            in_progress = target.in_progress()
    except ByodError as exc:
        problem = f"cannot read the instance's stamp: {exc.message}"
        return VerifyReport(user.id, user.clerk_id, config.schema_version, None, (problem,))
    problems = check_stamp(ws.registry, stamp)
    for step_id in in_progress:
        if step_id.endswith(UNDO_SUFFIX):
            problems.append(
                f"the rollback of {step_id.removesuffix(UNDO_SUFFIX)} is in progress (part of "
                "its data undone, its stamp still there): `byod rollback` finishes it"
            )
        elif ws.registry.get(step_id) is None:
            problems.append(
                f"{step_id} is in progress on the instance, and the registry has no such "
                "migration (renamed or removed halfway): restore its file and migrate"
            )
        else:
            problems.append(
                f"{step_id} is in progress (its backfills not finished): `byod migrate` finishes it"
            )
    instance_version = stamp[-1].version if stamp else 0
    if instance_version != config.schema_version:
        problems.append(
            f"the control plane says version {config.schema_version}, the instance's stamp "
            f"says {instance_version} (the next migrate adopts the instance's)"
        )
    return VerifyReport(
        user.id, user.clerk_id, config.schema_version, instance_version, tuple(problems)
    )
