"""Moving instances: plans, migrations and rollbacks of one user or a fleet, and
the record of fleet runs."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Annotated

import typer
import typer.core

from byod import commands
from byod.cli import progress, render
from byod.cli.base import (
    MAX_INT,
    All,
    AllowDirty,
    BatchPause,
    BatchSize,
    Canary,
    Concurrency,
    DatabaseUrl,
    Json,
    LeaseSeconds,
    MaxFailureRatio,
    Migrations,
    OptionalUser,
    Processes,
    Retries,
    Timeout,
    Version,
    app,
    err,
    fleet_options,
    one_target,
    out,
    refuse_fleet_only,
    runs_app,
    say,
    single_options,
    user_list,
    workspace_for,
)
from byod.errors import InputError
from byod.spec import (
    DEFAULT_CONCURRENCY,
    DEFAULT_IN_FLIGHT,
    FleetOptions,
    Selection,
    default_concurrency,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from byod.distributed import RunProgress
    from byod.fleet import FleetEvent, FleetSummary
    from byod.workspace import Workspace


@app.command()
def plan(
    user: OptionalUser = None,
    every: All = False,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Dry run: what would run where."""
    plans = commands.plan(workspace_for(database_url, migrations), one_target(user, every))
    if json_out:
        out.print(render.dump(render.plans_data(plans)))
    elif not plans:
        out.print("nothing to do: every eligible user is at head")
    else:
        out.print(render.plans_table(plans))


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
    batch_size: BatchSize = None,
    batch_pause: BatchPause = None,
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
    rehearse: Annotated[
        bool,
        typer.Option(
            "--rehearse",
            help="Rehearse: run every pending step in one instance transaction per user, "
            "then roll it all back; nothing committed, the ledger untouched (SQLite, "
            "PostgreSQL).",
        ),
    ] = False,
    rehearse_first: Annotated[
        bool,
        typer.Option(
            "--rehearse-first",
            help="With --all: rehearse every user first; run for real only if all passed "
            "(or at most --max-failure-ratio failed: those are left out and reported).",
        ),
    ] = False,
    skip_unsupported: Annotated[
        bool,
        typer.Option(
            "--rehearse-skip-unsupported",
            help="With --rehearse(-first) --all: skip (and report) users on MySQL/MariaDB "
            "or Convex instead of refusing the run.",
        ),
    ] = False,
    allow_dirty: AllowDirty = False,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Apply pending migrations to one user, or to every eligible user (--all)."""
    ws = workspace_for(database_url, migrations, allow_dirty=allow_dirty)
    target = one_target(user, every or users is not None)
    if allow_dirty and distributed:
        raise InputError(
            "--allow-dirty runs here, against local deployments: leave out --distributed"
        )
    if (rehearse or rehearse_first) and distributed:
        raise InputError("rehearsals run here, not on workers: leave out --distributed")
    if rehearse and rehearse_first:
        raise InputError("give --rehearse (only rehearse) or --rehearse-first, not both")
    if skip_unsupported and not (rehearse or rehearse_first):
        raise InputError("--rehearse-skip-unsupported goes with --rehearse or --rehearse-first")
    if (rehearse_first or skip_unsupported) and target is not None:
        raise InputError("--rehearse-first and --rehearse-skip-unsupported run a fleet: use --all")
    if (detach or per_host is not None) and not distributed:
        raise InputError("--detach and --per-host go with --distributed")
    if target is not None:
        if distributed:
            raise InputError("--distributed runs a fleet: use --all (or --users)")
        refuse_fleet_only(
            concurrency=concurrency,
            canary=canary,
            max_failure_ratio=max_failure_ratio,
            processes=processes,
            only_version=only_version,
            limit=limit,
        )
        single = single_options(
            retries, timeout, lease_seconds, batch_size=batch_size, batch_pause=batch_pause
        )
        if rehearse:
            result = commands.rehearse_user(ws, target, to_version=to, options=single)
            progress.finish_user(out, err, result, json_out, "rehearsed (rolled back)")
            return
        result = commands.migrate_user(ws, target, to_version=to, options=single)
        progress.finish_user(out, err, result, json_out, "migrated")
        return
    if concurrency is None:
        concurrency = default_concurrency(distributed)
    options = fleet_options(
        concurrency=concurrency,
        retries=retries,
        timeout=timeout,
        lease_seconds=lease_seconds,
        canary=canary,
        max_failure_ratio=max_failure_ratio,
        processes=processes,
        batch_size=batch_size,
        batch_pause=batch_pause,
    )
    refs = user_list(users)
    selection = Selection(
        None if refs is None else commands.resolve_users(ws, refs), only_version, limit
    )
    if distributed:
        _migrate_distributed(ws, options, selection, to, per_host, detach, json_out)
        return
    if rehearse_first:
        _rehearse_first(ws, options, selection, to, skip_unsupported, json_out)
        return
    run = (
        functools.partial(commands.rehearse_fleet, skip_unsupported=skip_unsupported)
        if rehearse
        else commands.migrate_fleet
    )
    _fleet_run(
        lambda on_event: run(
            ws, options=options, selection=selection, to_version=to, on_event=on_event
        ),
        json_out,
    )


def _rehearse_first(
    ws: Workspace,
    options: FleetOptions,
    selection: Selection,
    to: int | None,
    skip_unsupported: bool,
    json_out: bool,
) -> None:
    """Rehearse, then (if it passed) migrate: the rehearsal's summary first, then the
    real run's; exit 1, nothing touched, when the rehearsal stops the rollout."""
    runs: list[FleetSummary] = []

    def both(on_event: Callable[[FleetEvent | RunProgress], None]) -> FleetSummary:
        rehearsal, real = commands.rehearse_then_migrate(
            ws,
            options=options,
            selection=selection,
            to_version=to,
            on_event=on_event,
            skip_unsupported=skip_unsupported,
            on_rehearsed=rehearsed,
        )
        runs.append(rehearsal)
        return rehearsal if real is None else real

    def rehearsed(summary: FleetSummary) -> None:  # between the two runs' lines
        if json_out:
            out.print(render.dump({"rehearsal": summary.as_dict()}))

    last = progress.run_fleet(out, err, both, json_out)
    rehearsal = runs[0]
    if last is rehearsal:
        if not json_out:  # its --json summary is printed already
            progress.print_summary(out, err, rehearsal, json_out)
        say(
            f"[red]not migrated:[/] the rehearsal ({rehearsal.run_id}) found {rehearsal.failed} "
            "failing users; nothing was touched",
            level=logging.ERROR,
        )
        raise typer.Exit(1)
    left_out = f", {rehearsal.failed} failed and left out" if rehearsal.failed else ""
    say(f"rehearsal {rehearsal.run_id}: {rehearsal.succeeded} passed{left_out}")
    progress.print_failures(rehearsal, "[yellow]left out:[/]")
    progress.print_summary(out, err, last, json_out)
    if not last.ok or rehearsal.failed:
        raise typer.Exit(1)


def _migrate_distributed(
    ws: Workspace,
    options: FleetOptions,
    selection: Selection,
    to: int | None,
    per_host: int | None,
    detach: bool,
    json_out: bool,
) -> None:
    """Start a run on the task-queue workers; follow it here unless ``detach``."""
    run_id = commands.migrate_distributed(
        ws, options=options, selection=selection, to_version=to, per_host=per_host
    )
    if detach:
        _print_started(run_id, json_out)
    else:
        _follow(ws, run_id, json_out, stop_on_interrupt=True)


def _print_started(run_id: str, json_out: bool) -> None:
    if json_out:
        out.print(render.dump({"run_id": run_id}))
    else:
        out.print(run_id)
        say(f"run {run_id} started; watch it with `byod runs show {run_id} --follow`")


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
    summary = progress.run_fleet(out, err, work, json_out)
    progress.print_summary(out, err, summary, json_out)
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
    ws = workspace_for(database_url, migrations)
    if run is not None:
        if user is not None or to is not None:
            raise InputError("--run undoes a whole fleet run: give no USER and no --to")
        options = fleet_options(
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
    refuse_fleet_only(concurrency=concurrency, canary=canary, max_failure_ratio=max_failure_ratio)
    single = single_options(retries, timeout, lease_seconds)
    result = commands.rollback_user(ws, user, to, options=single)
    progress.finish_user(out, err, result, json_out, "rolled back")


@runs_app.callback(invoke_without_command=True)
def runs(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", metavar="N", min=1, max=10_000)] = 20,
    noop: Annotated[
        bool,
        typer.Option(
            "--noop", help="Also the no-op runs: those that moved nobody (hidden by default)."
        ),
    ] = False,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Fleet runs, newest first (`byod runs show RUN` for one)."""
    if ctx.invoked_subcommand is not None:
        return
    ws = workspace_for(database_url, None)
    records = commands.list_runs(ws, limit=limit, noop=noop)
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
    ws = workspace_for(database_url, None)
    if follow:
        try:
            _follow(ws, run, json_out, stop_on_interrupt=False)
        except KeyboardInterrupt:
            say(f"stopped watching; run {run} goes on")
            raise typer.Exit(130) from None
        return
    details = commands.show_run(ws, run)
    if json_out:
        data = render.run_data(details.run)
        data["rows_done"] = details.rows_done
        data["rows_total"] = details.rows_total
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
    if commands.stop_run(workspace_for(database_url, None), run):
        out.print(f"run {run} stopping: running users finish, the rest are not started")
    else:
        out.print(f"run {run} was not running: nothing to stop")
