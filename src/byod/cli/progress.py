"""Showing results on the command line: one user's outcome, fleet progress, summaries."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, TypeVar

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from byod.cli import render
from byod.errors import PlanError
from byod.logs import fields, json_on_stderr
from byod.redact import mask

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

    from byod.distributed import RunProgress
    from byod.errors import ByodError
    from byod.fleet import FleetEvent, FleetSummary, RowsProgress
    from byod.results import UserResult

__all__ = ["finish_user", "print_error", "print_failures", "print_summary", "run_fleet"]

T = TypeVar("T")

_cli_log = logging.getLogger("byod.cli")


def finish_user(out: Console, err: Console, result: UserResult, json_out: bool, verb: str) -> None:
    if json_out:
        out.print(render.dump(render.result_data(result)))
    elif result.ok:
        if result.from_version == result.to_version:
            out.print(f"user {result.user_id}: nothing to do (version {result.to_version})")
        else:
            out.print(
                f"user {result.user_id}: {verb} from version {result.from_version} "
                f"to {result.to_version}"
            )
            for step in result.steps:
                out.print(f"  {step.migration_id} {step.direction}: {step.status}")
        if result.held is not None:
            migration_id, reason = result.held
            out.print(
                f"[yellow]held:[/] stopped before {escape(migration_id)}: {render.plain(reason)}"
            )
    if result.rehearsal and not json_out:
        out.print(render.REHEARSAL_NOTE)
    if result.error is not None:
        if not json_out:
            print_error(err, result.error)
        # a target version that makes no plan is a usage mistake (nothing was touched)
        raise typer.Exit(2 if isinstance(result.error, PlanError) else 1)


def run_fleet(
    out: Console,
    err: Console,
    work: Callable[[Callable[[FleetEvent | RunProgress], None]], T],
    json_out: bool,
) -> T:
    """Run a fleet job, showing progress: JSON lines, or a bar on a terminal."""
    # imported here: `byod --help` and the reports never load the fleet machinery
    from byod.distributed import RunProgress
    from byod.fleet import FleetStarted, RowsProgress, UserFinished

    if json_out:

        def emit(event: FleetEvent | RunProgress) -> None:
            if isinstance(event, UserFinished):
                data = render.result_data(event.result) | {"outcome": event.outcome}
                out.print(render.dump(data))

        return work(emit)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _FailedColumn(),
        _RateColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal or json_on_stderr(),
    )
    task = progress.add_task("migrating", total=None, failed=0, unit="users")
    failed = 0
    backfills = _BackfillBars(progress)

    def show(event: FleetEvent | RunProgress) -> None:
        nonlocal failed
        if isinstance(event, FleetStarted):
            progress.update(task, total=event.total)
        elif isinstance(event, RunProgress):
            progress.update(task, completed=event.done, failed=event.failed, total=event.total)
        elif isinstance(event, RowsProgress):
            backfills.show(event)
        elif isinstance(event, UserFinished):
            backfills.forget(event.result.user_id)
            failed += event.outcome == "failed"
            progress.update(task, advance=1, failed=failed)

    with progress:
        return work(show)


class _BackfillBars:
    """A bar per backfill in progress (rows done of the estimated total), moved by each
    batch; a user's bars go when the user is done. Fed from the runner's threads."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[tuple[int, str], TaskID] = {}
        self.lock = threading.Lock()

    def show(self, event: RowsProgress) -> None:
        key = (event.user_id, event.migration_id)
        total = max(event.rows_total or 0, event.rows_done) or None
        with self.lock:
            task = self.tasks.get(key)
            if task is None:
                task = self.tasks[key] = self.progress.add_task(
                    f"  user {event.user_id} {event.migration_id}", total=total, unit="rows"
                )
        self.progress.update(task, completed=event.rows_done, total=total)

    def forget(self, user_id: int) -> None:
        with self.lock:
            done = [key for key in self.tasks if key[0] == user_id]
            for key in done:
                self.progress.remove_task(self.tasks.pop(key))


class _FailedColumn(ProgressColumn):
    """How many users failed (on the fleet's bar only)."""

    def render(self, task: Task) -> Text:
        if "failed" not in task.fields:
            return Text("")
        return Text.from_markup(f"[red]{task.fields['failed']} failed")


class _RateColumn(ProgressColumn):
    """Users (or a backfill's rows) per second."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "users")
        return Text(f"{task.speed:.1f} {unit}/s" if task.speed else "")


def print_summary(out: Console, err: Console, summary: FleetSummary, json_out: bool) -> None:
    if json_out:
        out.print(render.dump({"summary": summary.as_dict()}))
    else:
        out.print(f"run {summary.run_id} {summary.state}: {render.counts_line(summary)}")
        for held in summary.held:
            plural = "user" if held.users == 1 else "users"
            out.print(
                f"[yellow]held:[/] {held.users} {plural} stopped before "
                f"{escape(held.migration)}: {render.plain(held.reason)}"
            )
        if summary.rehearsal:
            out.print(render.REHEARSAL_NOTE)
    if json_on_stderr():  # each failure is in the log already, one record per user
        _log_run_end(summary)
        return
    if json_out:
        return
    if summary.halt_reason:
        err.print(f"[yellow]halted:[/] {escape(summary.halt_reason)}")
    print_failures(summary)


def print_failures(summary: FleetSummary, label: str = "[red]failed:[/]") -> None:
    """A line on stderr per failed user of the run (a log record each with --log-format
    json): ``label user at migration: error``."""
    from byod.cli.base import say

    for error in summary.errors:
        where = f" at {error.migration}" if error.migration else ""
        say(
            f"{label} {render.plain(error.user)}{where}: {render.plain(error.error)}",
            level=logging.WARNING,
        )


def _log_run_end(summary: FleetSummary) -> None:
    level = logging.INFO if summary.state == "completed" and not summary.failed else logging.WARNING
    reason = f" ({summary.halt_reason})" if summary.halt_reason else ""
    _cli_log.log(
        level,
        "run %s %s%s: %s",
        summary.run_id,
        summary.state,
        reason,
        render.counts_line(summary),
        extra=fields(run_id=summary.run_id, outcome=summary.state),
    )


def print_error(err: Console, error: ByodError) -> None:
    """``error: ErrorClass: message`` (the class is one the error table lists:
    docs/reference/errors.md),
    then the hint; with ``--log-format json``, one JSON record instead. Secrets byod
    knows are masked (an instance's error may echo one)."""
    error.message = mask(error.message)
    if json_on_stderr():
        hint = f" (hint: {error.hint})" if error.hint else ""
        _cli_log.error("%s%s", error.message, hint, extra=fields(error=type(error).__name__))
        return
    err.print(f"[red]error:[/] {type(error).__name__}: {render.plain(error.message)}")
    if error.hint:
        err.print(f"[dim]hint:[/] {render.plain(error.hint)}")
