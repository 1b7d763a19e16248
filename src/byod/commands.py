"""The commands, as plain functions of a :class:`Workspace` (Alembic's ``command`` style).

Each opens what it needs, calls the core (runner, fleet, control plane) and returns plain
data; every front end (the command line, the HTTP service and its dashboard, the task
queue's worker) calls these and only renders what they return.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from byod import fleet
from byod.controlplane import (
    FleetStatus,
    LedgerRow,
    RunRecord,
    RunStore,
    User,
    count_ahead,
    create_tables,
    fleet_status,
    history,
    iter_outdated,
)
from byod.controlplane.schema import configs, control_plane_id
from byod.credentials import ReachResult, connect_user, open_instance, unseal_config
from byod.crypto import KeySource
from byod.distributed import (
    Dispatcher,
    RunProgress,
    follow_run,
    require_server_control_plane,
    start_distributed,
)
from byod.errors import ByodError, DriftError, InputError
from byod.fleet import ELIGIBLE_STATUSES, FleetEvent, FleetOptions, FleetSummary, Selection, attempt
from byod.registry import Plan, Registry
from byod.runner import Runner, UserResult, check_stamp
from byod.settings import (
    LOCAL_MIGRATIONS,
    bundled_migrations_dir,
    normalize_url,
    safe_url,
)
from byod.text import has_control
from byod.workspace import Workspace

__all__ = [
    "InitResult",
    "RunDetails",
    "UserPlan",
    "VerifyReport",
    "Workspace",
    "add_user",
    "check_worker",
    "connect",
    "follow",
    "init",
    "list_runs",
    "migrate_distributed",
    "migrate_fleet",
    "migrate_user",
    "new_migration",
    "pending",
    "plan",
    "repair",
    "rollback_fleet_run",
    "rollback_user",
    "show_run",
    "status",
    "stop_run",
    "user_history",
    "verify",
]


@dataclass(frozen=True)
class InitResult:
    """What ``init`` set up."""

    database: str
    key: KeySource
    head: int


def init(ws: Workspace) -> InitResult:
    """Create the control-plane tables (idempotent) and make sure a key is available."""
    url = normalize_url(ws.settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    create_tables(ws.engine)
    ws.sealer  # noqa: B018 - loads or creates the key
    assert ws.key_source is not None
    return InitResult(safe_url(url), ws.key_source, ws.registry.head)


def add_user(ws: Workspace, clerk_id: str, email: str | None = None) -> User:
    """Register an app user."""
    return ws.directory.add_user(clerk_id, email)


def connect(
    ws: Workspace,
    user_ref: str,
    url: str,
    *,
    secret: str | None = None,
    timeout: float = 10.0,
    queue: str | None = None,
) -> tuple[User, ReachResult]:
    """Seal and store a user's instance credentials and check the instance answers;
    ``queue`` routes the user's distributed tasks to workers consuming that queue."""
    user = ws.directory.find_user(user_ref)
    return user, connect_user(
        ws.directory,
        ws.sealer,
        user.id,
        url,
        secret=secret,
        timeout=timeout,
        queue=queue,
        policy=ws.settings.instance_policy,
    )


def status(ws: Workspace) -> FleetStatus:
    """The fleet at a glance (no instance is contacted)."""
    ws.require_tables()
    return fleet_status(ws.engine, ws.registry.head)


@dataclass(frozen=True)
class UserPlan:
    """What a migrate would do for one user, from the control plane's view."""

    user_id: int
    clerk_id: str
    plan: Plan


def plan(ws: Workspace, user_ref: str | None) -> list[UserPlan]:
    """Dry run: the steps ``migrate`` would run, per user (``None``: every eligible user).

    Raises :class:`DriftError`, as ``migrate`` does, when a user is recorded above the
    folder's head (the folder lacks migrations that are applied)."""
    registry = ws.registry
    if user_ref is not None:
        user = ws.directory.find_user(user_ref)
        config = ws.directory.get_config(user.id)
        _refuse_user_ahead(ws, user, config.schema_version)
        return [UserPlan(user.id, user.clerk_id, registry.plan_up(config.schema_version))]
    ws.require_tables()
    _refuse_fleet_ahead(ws)
    return [
        UserPlan(row.user_id, row.clerk_id, registry.plan_up(row.schema_version))
        for row in iter_outdated(ws.engine, registry.head, statuses=ELIGIBLE_STATUSES)
    ]


def _refuse_user_ahead(ws: Workspace, user: User, version: int) -> None:
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
    ``timeout``, ``retries`` (transient failures, with backoff) and ``lease_seconds``."""
    ws.require_tables()
    runner = _single_runner(ws, options)
    user = runner.prepare(ws.directory.find_user(user_ref).id)
    target = ws.registry.head if to_version is None else to_version
    refused = runner.refuse_foreign_key(user)
    return refused or attempt(runner, "migrate", user, target, options, None)[0]


def _single_runner(ws: Workspace, options: FleetOptions) -> Runner:
    return ws.runner().configured(
        run_id=None, timeout=options.timeout, lease_seconds=options.lease_seconds
    )


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
    return fleet.migrate_fleet(
        ws.runner(),
        options=options,
        selection=selection,
        to_version=to_version,
        on_event=on_event,
        started_by=started_by,
    )


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


def check_worker(ws: Workspace) -> None:
    """What a task-queue worker needs, checked before it takes a task: a shared
    (PostgreSQL) control plane made by ``byod init``, the migrations, the key."""
    require_server_control_plane(ws.engine)
    ws.require_tables()
    ws.registry  # noqa: B018 - a broken migrations folder fails here, not in every task
    ws.sealer  # noqa: B018 - so does a missing key


def list_runs(ws: Workspace, *, limit: int = 20) -> list[RunRecord]:
    """The newest fleet runs."""
    ws.require_tables()
    return RunStore(ws.engine).recent(limit)


@dataclass(frozen=True)
class RunDetails:
    """One run with its failures."""

    run: RunRecord
    failures: list[tuple[int, str, str, str | None]]


def show_run(ws: Workspace, run_id: str) -> RunDetails:
    """One fleet run and the steps that failed in it."""
    ws.require_tables()
    store = RunStore(ws.engine)
    return RunDetails(store.get(run_id), store.failures(run_id))


def rollback_user(
    ws: Workspace, user_ref: str, to_version: int, *, options: FleetOptions = FleetOptions()
) -> UserResult:
    """Roll one user back to ``to_version`` (honouring ``options`` as :func:`migrate_user`)."""
    ws.require_tables()
    runner = _single_runner(ws, options)
    user = runner.prepare_rollback(ws.directory.find_user(user_ref).id, to_version)
    refused = runner.refuse_foreign_key(user)
    return refused or attempt(runner, "rollback", user, to_version, options, None)[0]


def repair(ws: Workspace, user_ref: str) -> list[str]:
    """Clear a user's dirty markers after a hand repair (MySQL/MariaDB instances)."""
    ws.require_tables()
    return ws.runner().repair(ws.directory.find_user(user_ref).id)


def user_history(
    ws: Workspace, user_ref: str, *, limit: int | None = None
) -> tuple[User, list[LedgerRow]]:
    """A user's ledger rows, newest first."""
    user = ws.directory.find_user(user_ref)
    return user, history(ws.engine, user.id, limit=limit)


def pending(ws: Workspace, user_ref: str) -> int:
    """How many migrations the user's instance still needs (control plane's view)."""
    user = ws.directory.find_user(user_ref)
    config = ws.directory.get_config(user.id)
    _refuse_user_ahead(ws, user, config.schema_version)
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


def verify(ws: Workspace, user_ref: str | None) -> list[VerifyReport]:
    """Compare each instance's stamp with the registry's checksums and the control plane."""
    directory = ws.directory
    if user_ref is not None:
        users = [directory.find_user(user_ref)]
    else:
        with ws.engine.connect() as conn:
            ids = conn.execute(sa.select(configs.c.user_id).order_by(configs.c.user_id)).scalars()
            users = [directory.get_user(int(user_id)) for user_id in ids]  # ids, not refs
    return [_verify_one(ws, user) for user in users]


def _verify_one(ws: Workspace, user: User) -> VerifyReport:
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
    except ByodError as exc:
        problem = f"cannot read the instance's stamp: {exc.message}"
        return VerifyReport(user.id, user.clerk_id, config.schema_version, None, (problem,))
    problems = check_stamp(ws.registry, stamp)
    instance_version = stamp[-1].version if stamp else 0
    if instance_version != config.schema_version:
        problems.append(
            f"the control plane says version {config.schema_version}, the instance's stamp "
            f"says {instance_version} (the next migrate adopts the instance's)"
        )
    return VerifyReport(
        user.id, user.clerk_id, config.schema_version, instance_version, tuple(problems)
    )


_TEMPLATE = '''"""{title}"""

import sqlalchemy as sa

from byod import Migration, MigrationContext


def up(ctx: MigrationContext) -> None:
    # DDL through ctx.op (Alembic Operations), data through ctx.conn; both in one
    # transaction with the stamp, so a failure leaves no trace.
    raise NotImplementedError("write the change")


def down(ctx: MigrationContext) -> None:
    # Undo up(); delete this function (and pass down=None) if it cannot be undone.
    raise NotImplementedError("write the undo")


migration = Migration(
    id="{id}",
    version={version},
    name={name},
    description={description},
    up=up,
    down=down,
)
'''
#: Longest name ``byod new`` takes (it becomes the migration's name and description).
MAX_NAME = 200
_MAX_SLUG = 60


def new_migration(ws: Workspace, name: str) -> Path:
    """Write the next migration file, ``NNN_slug.py``, from a template.

    With no migrations folder configured, the app's folder becomes ``./migrations``,
    started from a copy of the bundled example app so versions go on from its head.
    The name is written into the file as Python string literals (whatever it holds);
    the file is compiled before it is written, and an existing file is never replaced.
    """
    title = " ".join(name.split())
    if has_control(title):
        raise InputError(f"{name!r}: a migration name must not hold control characters")
    if len(title) > MAX_NAME:
        raise InputError(f"a migration name is at most {MAX_NAME} characters (not {len(title)})")
    slug = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")[:_MAX_SLUG].strip("_")
    if not slug:
        raise InputError(f"{name!r} makes no file name: use letters and digits")
    folder = ws.settings.migrations_dir
    if not ws.settings.migrations_configured:
        folder = Path.cwd() / LOCAL_MIGRATIONS
        _make_folder(folder)
        for example in sorted(bundled_migrations_dir().glob("[0-9]*.py")):
            shutil.copyfile(example, folder / example.name)
    _make_folder(folder)
    version = Registry.load(folder).head + 1
    migration_id = f"{version:03d}_{slug}"
    path = folder / f"{migration_id}.py"
    source = _TEMPLATE.format(
        title=title.replace("\\", "/").replace('"', "'"),
        id=migration_id,
        version=version,
        name=repr(title),
        description=repr(title + "."),
    )
    compile(source, str(path), "exec")  # a name can never make a file that does not load
    try:
        with path.open("x") as handle:
            handle.write(source)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from exc
    return path


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the migrations folder {folder}: {exc.strerror}") from exc
