"""The ``byod`` command line: parse, call one function in ``commands``, render.

Exit status: 0 all good, 1 something failed (the output says what), 2 bad usage or input.
Errors are caught once, in :func:`main`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, TypeVar

import typer
import typer.core
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from byod import _render as render
from byod import _show as show
from byod import commands
from byod.distributed import Broker
from byod.distributed.run import DEFAULT_IN_FLIGHT, RunProgress
from byod.errors import ByodError, InputError, SettingsError
from byod.fleet import (
    DEFAULT_CONCURRENCY,
    FleetEvent,
    FleetOptions,
    FleetSummary,
    Selection,
)
from byod.settings import Settings
from byod.workspace import Workspace

__all__ = ["app", "main"]

T = TypeVar("T")


def _usage_name(argument: typer.core.TyperArgument) -> str:
    name = argument.display_name_raw
    return name if argument.required else f"[{name}]"


def _no_type(argument: typer.core.TyperArgument, ctx: object) -> str | None:
    return None


# Arguments shown as click shows them (``USER``, ``[USER]``), not as Typer 0.2x does
# (``{user}`` in the usage line, ``user <str>`` in the list); Typer builds its argument
# objects itself, so its class is where that is said.
typer.core.TyperArgument._usage_display_name = _usage_name  # type: ignore[method-assign, assignment]
typer.core.TyperArgument.display_type_rich = _no_type  # type: ignore[method-assign, assignment]

app = typer.Typer(
    help="Roll versioned schema migrations out to every user-owned database.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts hold [env: …] and [default: …] literally
)
users_app = typer.Typer(help="Manage app users.", no_args_is_help=True)
app.add_typer(users_app, name="users")
runs_app = typer.Typer(help="Fleet runs and their outcome.")
app.add_typer(runs_app, name="runs")

# Off a terminal (pipes, logs, CI) tables get room instead of 80 columns.
_WIDTH = None if sys.stdout.isatty() else 160
out = Console(highlight=False, soft_wrap=True, width=_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True)

#: Upper bounds for numbers from the command line: past them a value is a typo, and a
#: database would refuse it with an overflow instead of a clear message.
MAX_INT = 2**31 - 1
MAX_SECONDS = 7 * 24 * 3600.0

_USER_HELP = "A byod user id (ASCII digits only) or else a clerk id, matched exactly."
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url", metavar="URL", help="Control-plane URL [env: BYOD_DATABASE_URL]."
    ),
]
Migrations = Annotated[
    Path | None,
    typer.Option("--migrations", metavar="DIR", help="Migrations folder [env: BYOD_MIGRATIONS]."),
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
UserArg = Annotated[str, typer.Argument(metavar="USER", help=_USER_HELP, show_default=False)]
OptionalUser = Annotated[
    str | None, typer.Argument(metavar="USER", help=_USER_HELP, show_default=False)
]
Version = Annotated[
    int | None,
    typer.Option("--to", metavar="VERSION", min=0, max=MAX_INT, help="Target version."),
]
All = Annotated[bool, typer.Option("--all", help="Every eligible user.")]


def _workspace(
    database_url: str | None, migrations: Path | None, *, create_key: bool = False
) -> Workspace:
    settings = Settings.load(database_url=database_url, migrations=migrations)
    return Workspace(settings, create_key=create_key, broker=celery_broker)


def celery_broker(settings: Settings) -> Broker:
    """The task queue for distributed runs: the Celery adapter (imported only when a
    command needs it, so other commands never pay for importing Celery)."""
    from byod.taskqueue import CeleryBroker

    return CeleryBroker(settings)


def _one_target(user: str | None, every: bool) -> str | None:
    if (user is None) == (not every):
        raise InputError("give either a USER or --all (not both)")
    return user


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="Log every step to stderr.")
    ] = False,
    log_file: Annotated[
        Path | None,
        typer.Option(
            "--log-file",
            metavar="FILE",
            help="Append every step's log here [env: BYOD_LOG_FILE].",
        ),
    ] = None,
) -> None:
    """Logging: off on stderr unless -v or BYOD_LOG_LEVEL (errors are printed anyway);
    a log file, when named, gets every step at INFO."""
    logger = logging.getLogger("byod")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    level_name = "INFO" if verbose else os.environ.get("BYOD_LOG_LEVEL", "").upper()
    if level_name:
        handler = RichHandler(console=err, show_path=False, markup=False, rich_tracebacks=False)
        handler.setLevel(getattr(logging, level_name, logging.INFO))
        logger.addHandler(handler)
    file_name = log_file or os.environ.get("BYOD_LOG_FILE")
    if file_name:
        try:
            file_handler = logging.FileHandler(file_name)
        except OSError as exc:
            raise SettingsError(
                f"cannot write the log file {file_name}: {exc.strerror or exc}"
            ) from exc
        file_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s")
        )
        logger.addHandler(file_handler)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())


@app.command()
def init(database_url: DatabaseUrl = None, migrations: Migrations = None) -> None:
    """Create the control-plane tables (safe to run again)."""
    result = commands.init(_workspace(database_url, migrations, create_key=True))
    out.print(f"control plane ready: {escape(result.database)}")
    if result.key.created:
        out.print(f"created a new encryption key: {escape(result.key.description)} (mode 0600)")
        out.print("  keep it safe; in production set BYOD_ENCRYPTION_KEY instead")
    else:
        out.print(f"encryption key: {escape(result.key.description)}")
    out.print(f"migrations head version: {result.head}")


@users_app.command("add")
def users_add(
    clerk_id: Annotated[
        str,
        typer.Option(
            "--clerk-id",
            metavar="ID",
            help="External auth subject (the token's `sub`), stored exactly: not all digits, "
            "no control characters or surrounding spaces.",
        ),
    ],
    email: Annotated[str | None, typer.Option("--email", metavar="EMAIL")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Register a user; prints the new user id."""
    user = commands.add_user(_workspace(database_url, None), clerk_id, email)
    out.print(user.id)


@users_app.command("list")
def users_list(database_url: DatabaseUrl = None, json_out: Json = False) -> None:
    """List users."""
    users = _workspace(database_url, None).directory.list_users()
    if json_out:
        out.print(render.dump([asdict(u) for u in users]))
        return
    for user in users:
        out.print(f"{user.id}\t{render.plain(user.clerk_id)}\t{render.plain(user.email or '')}")


@app.command()
def connect(
    user: UserArg,
    url: Annotated[
        str,
        typer.Option(
            "--url",
            metavar="URL",
            help="SQLAlchemy URL of the user's database; '-' reads it from standard input "
            "(a hidden prompt on a terminal), out of `ps` and shell history.",
        ),
    ],
    secret: Annotated[
        str | None,
        typer.Option(
            "--secret",
            metavar="SECRET",
            help="Password, if not in the URL; '-' reads it from standard input (after the "
            "URL when both are '-').",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", metavar="SECONDS", min=0.1, max=MAX_SECONDS)
    ] = 10.0,
    queue: Annotated[
        str | None,
        typer.Option(
            "--queue",
            metavar="QUEUE",
            help="Task queue of the workers that can reach it (distributed).",
        ),
    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Seal and store a user's database credentials and check it answers."""
    ws = _workspace(database_url, None)
    url_text = _from_stdin("database URL") if url == "-" else url
    secret_text = _from_stdin("password") if secret == "-" else secret
    found, reach = commands.connect(
        ws, user, url_text, secret=secret_text, timeout=timeout, queue=queue
    )
    if reach.status == "connected":
        out.print(
            f"user {found.id} ({render.plain(found.clerk_id)}) connected, "
            f"instance at version {reach.schema_version}"
        )
        return
    err.print(
        f"[red]error:[/] {reach.error_type or 'UnreachableError'}: "
        f"{render.plain(reach.error or '')}\n"
        "[dim]hint:[/] the config is stored (status error); check the URL and that the "
        "database is up, then run `byod connect` again"
    )
    raise typer.Exit(1)


def _from_stdin(what: str) -> str:
    """One secret from standard input: a hidden prompt on a terminal, else one line."""
    if sys.stdin.isatty():
        text = str(typer.prompt(what.capitalize(), hide_input=True, err=True))
    else:
        text = sys.stdin.readline().rstrip("\r\n")
    if not text:
        raise InputError(f"no {what} on standard input")
    return text


@app.command()
def status(
    json_out: Json = False, database_url: DatabaseUrl = None, migrations: Migrations = None
) -> None:
    """Fleet status: users per version and connection status, recent failures."""
    result = commands.status(_workspace(database_url, migrations))
    if json_out:
        out.print(render.dump(render.fleet_status_data(result)))
    else:
        render.fleet_status_tables(result, out)


@app.command()
def plan(
    user: OptionalUser = None,
    every: All = False,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Dry run: what would run where."""
    plans = commands.plan(_workspace(database_url, migrations), _one_target(user, every))
    if json_out:
        out.print(render.dump(render.plans_data(plans)))
    elif not plans:
        out.print("nothing to do: every eligible user is at head")
    else:
        out.print(render.plans_table(plans))


_DEFAULTS = FleetOptions()
Concurrency = Annotated[
    int | None,
    typer.Option(
        "--concurrency",
        metavar="N",
        min=1,
        max=10_000,
        help=f"Users migrated at once (fleet runs) [default: {DEFAULT_CONCURRENCY}].",
        show_default=False,
    ),
]
Retries = Annotated[
    int | None,
    typer.Option(
        "--retries",
        metavar="N",
        min=0,
        max=100,
        help=f"Retries of a transient failure, with backoff [default: {_DEFAULTS.retries}; "
        "0 for one USER].",
        show_default=False,
    ),
]
Timeout = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        min=0.1,
        max=MAX_SECONDS,
        help="Seconds allowed per user (one USER too).",
    ),
]
LeaseSeconds = Annotated[
    float | None,
    typer.Option(
        "--lease-seconds",
        metavar="SECONDS",
        min=1,
        max=MAX_SECONDS,
        help=f"Lease length; renewed while working [default: {_DEFAULTS.lease_seconds:g}].",
        show_default=False,
    ),
]
Canary = Annotated[
    int | None,
    typer.Option(
        "--canary",
        metavar="N",
        min=0,
        max=MAX_INT,
        help="Migrate N users first; halt if any fails (fleet runs).",
    ),
]
Processes = Annotated[
    int | None,
    typer.Option(
        "--processes",
        metavar="N",
        min=1,
        max=256,
        help="Worker processes (one user each) instead of threads (fleet runs).",
    ),
]
MaxFailureRatio = Annotated[
    float | None,
    typer.Option(
        "--max-failure-ratio",
        metavar="RATIO",
        min=0,
        max=1,
        help="Halt once failed/done passes RATIO (fleet runs).",
    ),
]


def _fleet_options(**given: float | None) -> FleetOptions:
    """FleetOptions from the flags given (None: not given, the default applies)."""
    return FleetOptions(**{name: value for name, value in given.items() if value is not None})  # type: ignore[arg-type]


def _single_options(
    retries: int | None, timeout: float | None, lease_seconds: float | None
) -> FleetOptions:
    """One USER: no retries unless asked (an operator is watching), the rest as a fleet."""
    return _fleet_options(
        retries=0 if retries is None else retries, timeout=timeout, lease_seconds=lease_seconds
    )


def _refuse_fleet_only(**given: object) -> None:
    """One USER is not a fleet run: its fleet-only flags are refused, never ignored."""
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is not None]
    if named:
        raise InputError(
            f"{', '.join(named)} {'goes' if len(named) == 1 else 'go'} with a fleet run "
            "(--all, --users or --run); one USER takes --to, --timeout, --retries and "
            "--lease-seconds"
        )


def _user_list(value: str | None) -> tuple[str, ...] | None:
    """``--users``: comma-separated ids/clerk ids, or a file with one per line."""
    if value is None:
        return None
    path = Path(value)
    try:
        text = path.read_text() if path.is_file() else value.replace(",", "\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--users: cannot read {value}: {exc}") from exc
    refs = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not refs:
        raise InputError("--users names no user")
    return refs


@app.command()
def migrate(
    user: OptionalUser = None,
    every: All = False,
    to: Version = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            metavar="N",
            min=1,
            max=10_000,
            help=f"Users migrated at once [default: {DEFAULT_CONCURRENCY}]; with --distributed "
            f"the run's cap on tasks in flight [default: {DEFAULT_IN_FLIGHT}].",
            show_default=False,
        ),
    ] = None,
    retries: Retries = None,
    timeout: Timeout = None,
    lease_seconds: LeaseSeconds = None,
    canary: Canary = None,
    max_failure_ratio: MaxFailureRatio = None,
    processes: Processes = None,
    users: Annotated[
        str | None,
        typer.Option(
            "--users", metavar="A,B|FILE", help="Only these users (a,b,c or a file, one a line)."
        ),
    ] = None,
    only_version: Annotated[
        int | None,
        typer.Option(
            "--only-version",
            metavar="VERSION",
            min=0,
            max=MAX_INT,
            help="With --all: only users at VERSION.",
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", metavar="N", min=1, max=MAX_INT, help="At most N users."),
    ] = None,
    distributed: Annotated[
        bool,
        typer.Option(
            "--distributed",
            help="With --all: run on task-queue workers (`byod worker`); --concurrency "
            "caps the run's tasks in flight [needs BYOD_BROKER_URL].",
        ),
    ] = False,
    detach: Annotated[
        bool,
        typer.Option("--detach", help="With --distributed: print the run id and return."),
    ] = False,
    per_host: Annotated[
        int | None,
        typer.Option(
            "--per-host",
            metavar="N",
            min=1,
            max=10_000,
            help="With --distributed: at most N at once per DB server.",
        ),
    ] = None,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Apply pending migrations to one user, or to every eligible user (--all)."""
    ws = _workspace(database_url, migrations)
    target = _one_target(user, every or users is not None)
    if (detach or per_host is not None) and not distributed:
        raise InputError("--detach and --per-host go with --distributed")
    if target is not None:
        if distributed:
            raise InputError("--distributed runs a fleet: use --all (or --users)")
        _refuse_fleet_only(
            concurrency=concurrency,
            canary=canary,
            max_failure_ratio=max_failure_ratio,
            processes=processes,
            only_version=only_version,
            limit=limit,
        )
        single = _single_options(retries, timeout, lease_seconds)
        result = commands.migrate_user(ws, target, to_version=to, options=single)
        show.finish_user(out, err, result, json_out, "migrated")
        return
    if concurrency is None:
        concurrency = DEFAULT_IN_FLIGHT if distributed else DEFAULT_CONCURRENCY
    options = _fleet_options(
        concurrency=concurrency,
        retries=retries,
        timeout=timeout,
        lease_seconds=lease_seconds,
        canary=canary,
        max_failure_ratio=max_failure_ratio,
        processes=processes,
    )
    refs = _user_list(users)
    selection = Selection(
        None if refs is None else commands.resolve_users(ws, refs), only_version, limit
    )
    if distributed:
        run_id = commands.migrate_distributed(
            ws, options=options, selection=selection, to_version=to, per_host=per_host
        )
        if detach:
            _print_started(run_id, json_out)
            return
        _follow(ws, run_id, json_out, stop_on_interrupt=True)
        return
    _fleet_run(
        lambda on_event: commands.migrate_fleet(
            ws, options=options, selection=selection, to_version=to, on_event=on_event
        ),
        json_out,
    )


def _print_started(run_id: str, json_out: bool) -> None:
    if json_out:
        out.print(render.dump({"run_id": run_id}))
    else:
        out.print(run_id)
        err.print(f"run {run_id} started; watch it with `byod runs show {run_id} --follow`")


def _follow(ws: Workspace, run_id: str, json_out: bool, *, stop_on_interrupt: bool) -> None:
    """Follow a run to its end with the fleet run's progress and summary."""
    _fleet_run(
        lambda on_event: commands.follow(
            ws, run_id, on_event=on_event, stop_on_interrupt=stop_on_interrupt
        ),
        json_out,
    )


def _fleet_run(
    work: Callable[[Callable[[FleetEvent | RunProgress], None]], FleetSummary], json_out: bool
) -> None:
    """Show a fleet run's progress, then its summary; exit 1 unless it went to its end
    without a failure."""
    summary = show.run_fleet(out, err, work, json_out)
    show.print_summary(out, err, summary, json_out)
    if not summary.ok:
        raise typer.Exit(1)


@app.command()
def rollback(
    user: OptionalUser = None,
    to: Version = None,
    run: Annotated[
        str | None, typer.Option("--run", metavar="RUN", help="Undo what this fleet run moved.")
    ] = None,
    concurrency: Concurrency = None,
    retries: Retries = None,
    timeout: Timeout = None,
    lease_seconds: LeaseSeconds = None,
    canary: Canary = None,
    max_failure_ratio: MaxFailureRatio = None,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Undo migrations: one USER down to --to VERSION, or everything one --run moved."""
    ws = _workspace(database_url, migrations)
    if run is not None:
        if user is not None or to is not None:
            raise InputError("--run undoes a whole fleet run: give no USER and no --to")
        options = _fleet_options(
            concurrency=concurrency,
            retries=retries,
            timeout=timeout,
            lease_seconds=lease_seconds,
            canary=canary,
            max_failure_ratio=max_failure_ratio,
        )
        _fleet_run(
            lambda on_event: commands.rollback_fleet_run(
                ws, run, options=options, on_event=on_event
            ),
            json_out,
        )
        return
    if user is None or to is None:
        raise InputError("give USER --to VERSION, or --run RUN")
    _refuse_fleet_only(concurrency=concurrency, canary=canary, max_failure_ratio=max_failure_ratio)
    single = _single_options(retries, timeout, lease_seconds)
    result = commands.rollback_user(ws, user, to, options=single)
    show.finish_user(out, err, result, json_out, "rolled back")


@runs_app.callback(invoke_without_command=True)
def runs(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", metavar="N", min=1, max=10_000)] = 20,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Fleet runs, newest first (`byod runs show RUN` for one)."""
    if ctx.invoked_subcommand is not None:
        return
    records = commands.list_runs(_workspace(database_url, None), limit=limit)
    if json_out:
        out.print(render.dump([render.run_data(r) for r in records]))
    else:
        out.print(render.runs_table(records))


@runs_app.command("show")
def runs_show(
    run: Annotated[str, typer.Argument(metavar="RUN", help="Run id.")],
    follow: Annotated[
        bool,
        typer.Option("--follow", help="Show its progress until it ends, then its summary."),
    ] = False,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
) -> None:
    """One fleet run: options, state, counts and its failures."""
    ws = _workspace(database_url, None)
    if follow:
        try:
            _follow(ws, run, json_out, stop_on_interrupt=False)
        except KeyboardInterrupt:
            err.print(f"stopped watching; run {run} goes on")
            raise typer.Exit(130) from None
        return
    details = commands.show_run(ws, run)
    if json_out:
        data = render.run_data(details.run)
        data["failures"] = [
            {"user_id": u, "clerk_id": c, "migration": m, "error": e}
            for u, c, m, e in details.failures
        ]
        out.print(render.dump(data))
    else:
        render.run_details(details, out)


@runs_app.command("stop")
def runs_stop(
    run: Annotated[str, typer.Argument(metavar="RUN", help="Run id.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Stop a distributed run: queued users are not started, running ones finish."""
    if commands.stop_run(_workspace(database_url, None), run):
        out.print(f"run {run} stopping: running users finish, the rest are not started")
    else:
        out.print(f"run {run} was not running: nothing to stop")


@app.command()
def worker(
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency",
            metavar="N",
            min=1,
            max=1024,
            help="Worker processes: users migrated at once here.",
        ),
    ] = os.cpu_count() or 2,
    queues: Annotated[
        str | None,
        typer.Option(
            "--queues",
            metavar="A,B",
            help="Comma-separated queues to take tasks from [default: BYOD_QUEUE].",
        ),
    ] = None,
    loglevel: Annotated[
        str, typer.Option("--loglevel", metavar="LEVEL", help="Celery's log level.")
    ] = "INFO",
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Run a task-queue worker for distributed runs (needs BYOD_BROKER_URL and a
    PostgreSQL control plane); stop it with Ctrl-C (running users finish)."""
    names = [q.strip() for q in (queues or "").split(",") if q.strip()]
    if queues is not None and not names:
        raise InputError("--queues names no queue")
    from byod.taskqueue import serve_worker

    serve_worker(
        _workspace(database_url, migrations),
        concurrency=concurrency,
        queues=names,
        loglevel=loglevel.upper(),
    )


@app.command()
def repair(user: UserArg, database_url: DatabaseUrl = None, migrations: Migrations = None) -> None:
    """After undoing a half-applied step by hand (MySQL/MariaDB), mark the instance clean."""
    cleared = commands.repair(_workspace(database_url, migrations), user)
    if cleared:
        out.print(f"marked clean: {escape(', '.join(cleared))} will run again on the next migrate")
    else:
        out.print("the instance was not dirty: nothing to do")


@app.command()
def history(
    user: UserArg,
    limit: Annotated[int | None, typer.Option("--limit", metavar="N", min=1, max=MAX_INT)] = None,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
) -> None:
    """A user's migration history, newest first."""
    found, rows = commands.user_history(_workspace(database_url, None), user, limit=limit)
    if json_out:
        out.print(render.dump(render.history_data(rows)))
    else:
        out.print(render.history_table(f"history of user {found.id} ({found.clerk_id})", rows))


@app.command()
def pending(
    user: UserArg,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Number of migrations pending for a user."""
    count = commands.pending(_workspace(database_url, migrations), user)
    out.print(render.dump({"pending": count}) if json_out else count)


@app.command()
def verify(
    user: OptionalUser = None,
    every: All = False,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Check instance stamps and checksums against the registry and control plane."""
    reports = commands.verify(_workspace(database_url, migrations), _one_target(user, every))
    if json_out:
        out.print(render.dump([asdict(r) | {"ok": r.ok} for r in reports]))
    else:
        out.print(render.verify_table(reports))
    if not all(report.ok for report in reports):
        raise typer.Exit(1)


@app.command()
def new(
    name: Annotated[
        str,
        typer.Argument(metavar="NAME", help="What the migration does, e.g. 'add archived'."),
    ],
    migrations: Migrations = None,
) -> None:
    """Scaffold the next migration file in the migrations folder."""
    path = commands.new_migration(_workspace(None, migrations), name)
    out.print(f"created {escape(str(path))}")


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", metavar="HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="PORT", min=1, max=65535)] = 8000,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Serve the HTTP API and the operators' dashboard (BYOD_JWT_* configure tokens)."""
    import uvicorn

    from byod.api import AuthSettings, HttpSettings, create_app

    application = create_app(
        _workspace(database_url, migrations), AuthSettings.from_env(), HttpSettings.from_env()
    )
    access = logging.getLogger("byod.api.access")  # always on: who called what (no tokens)
    if not any(isinstance(h, RichHandler) for h in logging.getLogger("byod").handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        access.addHandler(handler)
    err.print(f"byod serving on http://{host}:{port} (dashboard: /dashboard)")
    # forwarded headers are the app's decision (BYOD_FORWARDED_ALLOW_IPS), and so is the
    # access log (uvicorn's would print query strings)
    uvicorn.run(
        application,
        host=host,
        port=port,
        log_level="warning",
        proxy_headers=False,
        access_log=False,
    )


@app.command()
def demo(
    tenants: Annotated[int, typer.Option("--tenants", metavar="N", min=1, max=100000)] = 5,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Build a local fleet of SQLite instances at version 1 and migrate them all to head."""
    from byod.demo import run_demo

    ws = _workspace(database_url, migrations, create_key=True)
    result = show.run_fleet(
        out, err, lambda on_event: run_demo(ws, tenants=tenants, on_event=on_event), False
    )
    show.print_summary(out, err, result.summary, False)
    render.fleet_status_tables(result.status, out)
    out.print(render.history_table(f"history of {result.sample_user}", result.sample_history))
    out.print(f"instances: {escape(str(result.folder))} ({result.created} created this time)")
    if result.setup.key.created:
        out.print(f"created a local encryption key: {escape(result.setup.key.description)}")
    if not result.summary.ok:
        raise typer.Exit(1)


# -- rendering helpers -------------------------------------------------------------------


def main() -> None:
    """Entry point of the ``byod`` script: runs the app, turns errors into exit codes."""
    try:
        app()
    except ByodError as error:
        show.print_error(err, error)
        sys.exit(error.exit_code)
