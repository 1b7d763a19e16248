"""Moving instances: plans, migrations and rollbacks of one user or a fleet, in this
process or on task-queue workers."""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from byod import fleet
from byod.controlplane import (
    RunStore,
    User,
    count_ahead,
    iter_outdated,
)
from byod.controlplane.rehearsals import not_rehearsable, rehearsed_users
from byod.controlplane.schema import control_plane_id
from byod.distributed import (
    Dispatcher,
    Publisher,
    RunProgress,
    TaskHandler,
    follow_run,
    require_server_control_plane,
    start_distributed,
)
from byod.errors import ControlPlaneError, DriftError, InputError, RehearsalError
from byod.fleet import FleetEvent, FleetSummary, attempt
from byod.gates import Gates
from byod.phased import Batching
from byod.spec import ELIGIBLE_STATUSES, FleetOptions, Selection
from byod.targets.convex_deploy import Deploy

if TYPE_CHECKING:
    from collections.abc import Callable

    from byod.registry import Plan
    from byod.results import UserResult
    from byod.runner import Runner
    from byod.workspace import Workspace

T = TypeVar("T")
log = logging.getLogger("byod.runner")


@dataclass(frozen=True)
class UserPlan:
    """What a migrate would do for one user, from the control plane's view."""

    user_id: int
    clerk_id: str
    plan: Plan
    #: the gate it would stop before (its migration id), and what holds it
    held: tuple[str, str] | None = None


def plan(ws: Workspace, user_ref: str | None) -> list[UserPlan]:
    """Dry run: the steps ``migrate`` would run, per user (``None``: every eligible user),
    each ending before a gate that is not open.

    Raises :class:`DriftError`, as ``migrate`` does, when a user is recorded above the
    folder's head (the folder lacks migrations that are applied)."""
    registry = ws.registry
    gates = Gates(ws.engine, registry)

    def planned(user_id: int, clerk_id: str, version: int) -> UserPlan:
        steps, hold = gates.cut(registry.plan_up(version))
        held = None if hold is None else (hold.migration_id, hold.reason)
        return UserPlan(user_id, clerk_id, steps, held)

    if user_ref is not None:
        user = ws.directory.find_user(user_ref)
        config = ws.directory.get_config(user.id)
        refuse_user_ahead(ws, user, config.schema_version)
        return [planned(user.id, user.clerk_id, config.schema_version)]
    ws.require_tables()
    _refuse_fleet_ahead(ws)
    return [
        planned(row.user_id, row.clerk_id, row.schema_version)
        for row in iter_outdated(ws.engine, registry.head, statuses=ELIGIBLE_STATUSES)
    ]


def refuse_user_ahead(ws: Workspace, user: User, version: int) -> None:
    """A user recorded above the folder's head: the folder lacks applied migrations."""
    head = ws.registry.head
    if version > head:
        raise DriftError(
            f"user {user.id} ({user.clerk_id}) is at version {version}, above this "
            f"migrations folder's head {head}: the folder lacks migrations applied there"
        )


def _refuse_fleet_ahead(ws: Workspace) -> None:
    """A fleet run (or its plan) refuses a migrations folder older than the fleet."""
    head = ws.registry.head
    count, first = count_ahead(ws.engine, head)
    if first is not None:
        raise DriftError(
            f"{count} user(s) are recorded above this migrations folder's head {head} (user "
            f"{first.user_id} ({first.clerk_id}) at version {first.schema_version}):"
            " the folder lacks migrations applied there; nothing was run"
        )


def migrate_user(
    ws: Workspace,
    user_ref: str,
    *,
    to_version: int | None = None,
    options: FleetOptions = FleetOptions(),
) -> UserResult:
    """Migrate one user (to head, or ``to_version``); of ``options`` it honours
    ``timeout``, ``retries`` (transient failures, with backoff), ``lease_seconds`` and
    the batching of backfills.

    Ctrl-C (in the calling thread) stops a backfill after its current batch, as in a
    fleet run: the step ends ``failed`` with ``StoppedError``, its cursor kept; a second
    Ctrl-C abandons the work where it is (its transaction rolled back)."""
    ws.require_tables()
    stop = threading.Event()
    runner = _single_runner(ws, options, stop)
    user = runner.prepare(ws.directory.find_user(user_ref).id)
    check_deploy(ws, user.id)
    target = ws.registry.head if to_version is None else to_version
    refused = runner.refuse_foreign_key(user)
    if refused is not None:
        return refused
    return _stoppable(lambda: attempt(runner, "migrate", user, target, options, stop)[0], stop)


def check_deploy(ws: Workspace, user_id: int | None = None) -> None:
    """:class:`SettingsError` before a run starts when its users include Convex
    deployments (``user_id``'s, or any) and the deploy step cannot work for any of them
    (no app folder, a command that is not found, a migration whose commit cannot be
    named — not committed, an unknown ``code_ref``): one clear error, not one per user."""
    if user_id is None:
        convex = ws.directory.has_kind("convex")
    else:
        convex = ws.directory.get_config(user_id).target_kind == "convex"
    if convex:
        deploy = Deploy.of(ws.settings.instance_policy)
        deploy.check()
        code = deploy.app_code()
        if code is not None:
            for migration in ws.registry:
                code.ref_for(migration)  # an uncommitted one refused here, once


def _single_runner(
    ws: Workspace, options: FleetOptions, stop: threading.Event | None = None
) -> Runner:
    return ws.runner().configured(
        run_id=None,
        timeout=options.timeout,
        lease_seconds=options.lease_seconds,
        batching=Batching.of(options, stop),
    )


def _stoppable(work: Callable[[], T], stop: threading.Event) -> T:
    """``work`` in a thread of its own, so that the first Ctrl-C here only sets ``stop``
    (the work ends at its next stopping point) and the second one ends the wait."""
    box: list[T] = []
    failed: list[BaseException] = []
    done = threading.Event()  # not Thread.join: a Ctrl-C inside join spoils its state

    def run() -> None:
        try:
            box.append(work())
        except BaseException as exc:  # handed to the waiting thread, raised there
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="byod-user", daemon=True).start()
    while not done.is_set():
        try:
            done.wait()
        except KeyboardInterrupt:
            if stop.is_set():
                raise
            stop.set()
            log.warning("stopping after the current batch (Ctrl-C again to abandon it)")
    if failed:
        raise failed[0]
    return box[0]


def migrate_fleet(
    ws: Workspace,
    *,
    options: FleetOptions = FleetOptions(),
    selection: Selection = Selection(),
    to_version: int | None = None,
    on_event: Callable[[FleetEvent], None] = lambda event: None,
    started_by: str | None = None,
) -> FleetSummary:
    """Migrate every eligible outdated user (or the selected ones), as one recorded run;
    ``started_by`` names who asked (default: this process's OS user)."""
    ws.require_tables()
    _refuse_fleet_ahead(ws)
    check_deploy(ws)
    return fleet.migrate_fleet(
        ws.runner(),
        options=options,
        selection=selection,
        to_version=to_version,
        on_event=on_event,
        started_by=started_by,
    )


def rehearse_user(
    ws: Workspace,
    user_ref: str,
    *,
    to_version: int | None = None,
    options: FleetOptions = FleetOptions(),
) -> UserResult:
    """Rehearse one user's pending steps and roll everything back (see
    :func:`byod.rehearsal.rehearse_user`); of ``options`` it honours ``timeout``, ``retries``
    (a busy instance, with backoff), ``lease_seconds`` and the batching of backfills."""
    ws.require_tables()
    stop = threading.Event()
    runner = _single_runner(ws, options, stop)
    user = runner.prepare(ws.directory.find_user(user_ref).id)
    refused = runner.refuse_foreign_key(user)
    if refused is not None:
        return refused
    target = ws.registry.head if to_version is None else to_version
    return _stoppable(lambda: attempt(runner, "rehearse", user, target, options, stop)[0], stop)


def rehearse_fleet(
    ws: Workspace,
    *,
    options: FleetOptions = FleetOptions(),
    selection: Selection = Selection(),
    to_version: int | None = None,
    on_event: Callable[[FleetEvent], None] = lambda event: None,
    started_by: str | None = None,
    skip_unsupported: bool = False,
) -> FleetSummary:
    """Rehearse every user a fleet run with these options would take, as one recorded run
    of kind ``rehearse`` (nothing committed in any instance, the ledger untouched).
    :class:`RehearsalError`, before anything starts, when some of them are on instances
    that cannot roll a migration back (it names them); ``skip_unsupported``: rehearse
    the others, those counted ``not_eligible`` with the reason in the log."""
    ws.require_tables()
    _refuse_fleet_ahead(ws)
    if not skip_unsupported:
        _refuse_not_rehearsable(ws, selection, to_version)
    return fleet.migrate_fleet(
        ws.runner(),
        options=options,
        selection=selection,
        to_version=to_version,
        on_event=on_event,
        started_by=started_by,
        rehearse=True,
    )


def _refuse_not_rehearsable(ws: Workspace, selection: Selection, to_version: int | None) -> None:
    """:class:`RehearsalError` naming the selected users whose instances cannot roll a
    migration back."""
    target = ws.registry.head if to_version is None else to_version
    count, names = not_rehearsable(
        ws.engine,
        target,
        ELIGIBLE_STATUSES,
        only_version=selection.only_version,
        user_ids=selection.users,
    )
    if count:
        more = f" and {count - len(names)} more" if count > len(names) else ""
        raise RehearsalError(
            f"{count} of the selected users are on instances that cannot be rehearsed "
            f"(MySQL/MariaDB or Convex): {', '.join(names)}{more}; nothing was touched"
        )


def rehearse_then_migrate(
    ws: Workspace,
    *,
    options: FleetOptions = FleetOptions(),
    selection: Selection = Selection(),
    to_version: int | None = None,
    on_event: Callable[[FleetEvent], None] = lambda event: None,
    started_by: str | None = None,
    skip_unsupported: bool = False,
    on_rehearsed: Callable[[FleetSummary], None] = lambda summary: None,
) -> tuple[FleetSummary, FleetSummary | None]:
    """Rehearse the selection; then, only if every user passed (or the share that failed
    is at most ``options.max_failure_ratio``), migrate the users that passed for real.
    Returns the rehearsal's summary and the real run's (None: nothing was touched)."""
    rehearsal = rehearse_fleet(
        ws,
        # the ratio is judged on the whole rehearsal, never a reason to stop it halfway
        options=dataclasses.replace(options, max_failure_ratio=None),
        selection=selection,
        to_version=to_version,
        on_event=on_event,
        started_by=started_by,
        skip_unsupported=skip_unsupported,
    )
    on_rehearsed(rehearsal)
    rehearsed = rehearsal.succeeded + rehearsal.failed
    allowed = options.max_failure_ratio or 0.0
    if rehearsal.state != "completed" or (rehearsed and rehearsal.failed / rehearsed > allowed):
        return rehearsal, None
    passed = rehearsed_users(ws.engine, rehearsal.run_id, "succeeded")
    if not passed:
        return rehearsal, None
    real = migrate_fleet(
        ws,
        options=options,
        selection=Selection(users=passed),
        to_version=to_version,
        on_event=on_event,
        started_by=started_by,
    )
    return rehearsal, real


def resolve_users(ws: Workspace, refs: tuple[str, ...]) -> tuple[int, ...]:
    """``USER`` references (byod ids or clerk ids, by :meth:`Directory.find_user`'s rule)
    as byod ids, each resolved once; an unknown one is bad input."""
    return tuple(dict.fromkeys(ws.directory.find_user(ref).id for ref in refs))


def rollback_fleet_run(
    ws: Workspace,
    run_id: str,
    *,
    options: FleetOptions = FleetOptions(),
    on_event: Callable[[FleetEvent], None] = lambda event: None,
) -> FleetSummary:
    """Return exactly the users one fleet run moved to their versions before it."""
    ws.require_tables()
    check_deploy(ws)
    return fleet.rollback_run(ws.runner(), run_id, options=options, on_event=on_event)


def migrate_distributed(
    ws: Workspace,
    *,
    options: FleetOptions = FleetOptions(),
    selection: Selection = Selection(),
    to_version: int | None = None,
    per_host: int | None = None,
    started_by: str | None = None,
) -> str:
    """Start a fleet run whose users are migrated by task-queue workers; returns its id.

    Checks, before anything is recorded, that a broker is configured and answers and
    that the control plane is one every worker can share (PostgreSQL).
    """
    dispatcher = _dispatcher(ws)
    _refuse_fleet_ahead(ws)
    ws.broker.check()
    return start_distributed(
        ws.runner(),
        dispatcher,
        options=options,
        selection=selection,
        to_version=to_version,
        per_host=per_host,
        started_by=started_by,
    )


def _dispatcher(ws: Workspace) -> Dispatcher:
    broker = ws.broker  # none configured: a SettingsError
    require_server_control_plane(ws.engine)
    ws.require_tables()
    return Dispatcher(ws.engine, broker.publish)


def follow(
    ws: Workspace,
    run_id: str,
    *,
    on_event: Callable[[FleetEvent | RunProgress], None] = lambda event: None,
    stop_on_interrupt: bool = False,
) -> FleetSummary:
    """Watch a fleet run until it ends and return its summary.

    With a broker configured, the watcher also nudges a distributed run along. With
    ``stop_on_interrupt``, Ctrl-C stops the run (queued users are not started, running
    ones finish) and the watch goes on to its end; otherwise Ctrl-C ends the watch only.
    """
    ws.require_tables()
    dispatcher = _dispatcher(ws) if ws.settings.broker_url else None
    try:
        return follow_run(ws.engine, run_id, on_event=on_event, dispatcher=dispatcher)
    except KeyboardInterrupt:
        if not stop_on_interrupt or dispatcher is None:
            raise
        dispatcher.stop(run_id, "interrupted", "stopped by Ctrl-C")
        return follow_run(ws.engine, run_id, dispatcher=dispatcher)


def stop_run(ws: Workspace, run_id: str) -> bool:
    """Stop a distributed run: nothing more is handed out, queued users are not started,
    running ones finish. False when it was no longer running."""
    ws.require_tables()
    record = RunStore(ws.engine).get(run_id)
    if not record.distributed:
        raise InputError(
            f"run {run_id} runs in one process: stop it with Ctrl-C where it runs",
            hint="`byod runs stop` stops distributed runs (started with --distributed).",
        )
    return _dispatcher(ws).stop(run_id, "interrupted", "stopped by `byod runs stop`")


def rollback_user(
    ws: Workspace, user_ref: str, to_version: int, *, options: FleetOptions = FleetOptions()
) -> UserResult:
    """Roll one user back to ``to_version`` (honouring ``options`` as :func:`migrate_user`)."""
    ws.require_tables()
    runner = _single_runner(ws, options)
    user = runner.prepare_rollback(ws.directory.find_user(user_ref).id, to_version)
    check_deploy(ws, user.id)
    refused = runner.refuse_foreign_key(user)
    return refused or attempt(runner, "rollback", user, to_version, options, None)[0]


def repair(ws: Workspace, user_ref: str) -> list[str]:
    """Clear a user's dirty markers after a hand repair (MySQL/MariaDB instances)."""
    ws.require_tables()
    return ws.runner().repair(ws.directory.find_user(user_ref).id)


def task_handler(ws: Workspace, publish: Publisher) -> TaskHandler:
    """What a task-queue worker process runs each task with: its runner and the run's
    bookkeeping, sending further tasks through ``publish``."""
    runner = ws.runner()
    return TaskHandler(runner, Dispatcher(runner.engine, publish))


def warm_up(handler: TaskHandler) -> None:
    """Open a control-plane connection and import Alembic ahead of a worker process's
    first task (:class:`ControlPlaneError` when it cannot be reached)."""
    import alembic.operations  # noqa: F401 - what every migration body needs

    if control_plane_id(handler.runner.engine) is None:  # one short read, one connection
        raise ControlPlaneError("the control plane cannot be read: run `byod init`")
