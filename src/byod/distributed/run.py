"""Starting a distributed fleet run, and following any run from any machine.

A distributed run is recorded like any fleet run (``byod_runs``), then its users are
handed to the task queue in keyset pages as workers finish earlier ones. Following it
reads the control plane only: the run's counts and its finished tasks, so the process
that started it may go away (``--detach``) and anyone may watch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from byod import errors
from byod.controlplane import FinishedTask, RunStore, TaskStore, refuse_drift_up_front
from byod.distributed.dispatch import Dispatcher, registry_digest
from byod.errors import BrokerError, ByodError, InputError
from byod.fleet import (
    FleetEvent,
    FleetFailure,
    FleetStarted,
    FleetSummary,
    UserFinished,
    size_selection,
)
from byod.results import UserResult, steps_from_json
from byod.runner import Runner
from byod.spec import ELIGIBLE_STATUSES, FleetOptions, RunCounts, RunSpec, Selection

__all__ = ["RunProgress", "follow_run", "stall_seconds", "start_distributed", "summary_of"]

log = logging.getLogger("byod.distributed")

#: Finished tasks are read again this far back, in case one committed late.
_WINDOW = timedelta(seconds=5)
#: A watcher sends again the tasks queued longer than this (lost by a broker); a task
#: whose worker died holding the user's lease, as soon as that lease lapses.
RESEND_AFTER_SECONDS = 300.0


def stall_seconds(lease_seconds: float) -> float:
    """How long a run may go without a task ending, its queued tasks waiting, before a
    watcher sends them again (their messages may be with a worker that died)."""
    return max(10.0, 3 * lease_seconds)


#: How often a watcher hands out users and looks for lost tasks.
_NUDGE_SECONDS = 5.0


@dataclass(frozen=True)
class RunProgress:
    """A run's counts so far (following a run whose users are not reported one by one)."""

    done: int
    failed: int
    total: int


def start_distributed(
    runner: Runner,
    dispatcher: Dispatcher,
    *,
    options: FleetOptions = FleetOptions(),
    selection: Selection = Selection(),
    to_version: int | None = None,
    per_host: int | None = None,
    started_by: str | None = None,
) -> str:
    """Record a distributed run and hand its first users to the queue; returns its id.

    ``options.concurrency`` is the cap on the run's tasks in flight; ``per_host`` caps
    concurrent migrations against one database server. The workers do the rest.
    """
    if per_host is not None and per_host < 1:
        raise InputError("--per-host must be at least 1")
    if options.processes != 1:
        raise InputError("--processes is for in-process runs: start more workers instead")
    refuse_drift_up_front(runner.engine, runner.registry)
    size = size_selection(runner, selection, to_version)
    spec = RunSpec(
        options=options,
        selection=selection,
        to_version=size.target,
        distributed=True,
        per_host=per_host,
        statuses=ELIGIBLE_STATUSES,
        user_ids=None if size.listed is None else tuple(user.id for user in size.listed),
        migrations=registry_digest(runner.registry),
    )
    store = RunStore(runner.engine)
    run_id = store.start("migrate", spec, started_by=started_by)
    up_to_date = size.up_to_date
    counts = RunCounts(total=up_to_date, up_to_date=up_to_date, not_eligible=size.not_eligible)
    store.progress(run_id, counts, planned=size.planned + up_to_date)
    try:
        dispatcher.top_up(run_id)
    except BrokerError as exc:
        raise BrokerError(
            f"run {run_id} is recorded but its first users could not be sent: {exc.message}",
            hint=f"Once the broker answers, `byod runs show {run_id} --follow` sends them "
            f"again; or give the run up with `byod runs stop {run_id}`.",
        ) from exc
    log.info("distributed run %s started: %d users planned", run_id, size.planned)
    return run_id


def follow_run(
    engine: sa.Engine,
    run_id: str,
    *,
    on_event: Callable[[FleetEvent | RunProgress], None] = lambda event: None,
    poll_seconds: float = 0.5,
    dispatcher: Dispatcher | None = None,
    until: Callable[[], bool] = lambda: False,
) -> FleetSummary:
    """Watch a run until it ends (or ``until()`` says stop) and return its summary.

    A distributed run's users are reported one by one (``UserFinished``) from its task
    rows; an in-process run's progress comes as :class:`RunProgress` counts. With a
    ``dispatcher`` the watcher also nudges the run along (hands out users, sends again
    tasks a broker lost), so a run with no starter left still ends.
    """
    store = RunStore(engine)
    record = store.get(run_id)
    on_event(FleetStarted(run_id, record.planned or 0))
    seen: dict[int, datetime] = {}
    since: datetime | None = None
    last_nudge = time.monotonic()
    while True:
        record = store.get(run_id)
        if record.distributed:
            since = _report_tasks(engine, run_id, since, seen, on_event)
        else:
            c = record.counts
            on_event(RunProgress(c.done, c.failed, record.planned or 0))
        if record.ended_at is not None or until():
            break
        if dispatcher is not None and time.monotonic() - last_nudge > _NUDGE_SECONDS:
            last_nudge = time.monotonic()
            _nudge(dispatcher, run_id, record.spec.options.lease_seconds)
        time.sleep(poll_seconds)
    return summary_of(engine, run_id)


def _nudge(dispatcher: Dispatcher, run_id: str, lease_seconds: float) -> None:
    try:
        dispatcher.top_up(run_id)
        dispatcher.resend_stale(
            run_id,
            RESEND_AFTER_SECONDS,
            lapsed_seconds=lease_seconds,
            stalled_seconds=stall_seconds(lease_seconds),
        )
    except ByodError as exc:
        log.warning("run %s: cannot hand out users now: %s", run_id, exc.message)


def _report_tasks(
    engine: sa.Engine,
    run_id: str,
    since: datetime | None,
    seen: dict[int, datetime],
    on_event: Callable[[FleetEvent | RunProgress], None],
) -> datetime | None:
    """Report the run's tasks finished since the last look; returns the new mark."""
    rows = TaskStore(engine).finished(run_id, None if since is None else since - _WINDOW)
    for row in rows:
        if row.user_id in seen or row.outcome == "not_started":
            continue
        seen[row.user_id] = row.finished_at
        on_event(UserFinished(_result(row), row.outcome, row.tries))
    if rows:
        since = max(since or rows[-1].finished_at, rows[-1].finished_at)
    if since is not None:
        for user_id in [u for u, at in seen.items() if at < since - _WINDOW]:
            del seen[user_id]
    return since


def _result(row: FinishedTask) -> UserResult:
    """A finished task as the runner's result, for the same JSON lines as in-process."""
    error = None
    if row.error is not None:
        kind = getattr(errors, str(row.error_type), None) if row.error_type else None
        error = (kind if isinstance(kind, type) else ByodError)(str(row.error))
    steps = steps_from_json(row.steps)
    return UserResult(
        user_id=row.user_id,
        clerk_id=row.clerk_id,
        from_version=row.from_version,
        to_version=row.from_version if row.to_version is None else row.to_version,
        steps=steps,
        error=error,
        seconds=row.seconds,
    )


def summary_of(engine: sa.Engine, run_id: str, *, errors_limit: int = 1000) -> FleetSummary:
    """A run's summary as recorded (the same fields as an in-process run's)."""
    record = RunStore(engine).get(run_id)
    summary = FleetSummary(
        run_id=run_id,
        state=record.shown_state,
        halt_reason=record.halt_reason,
        **asdict(record.counts),
    )
    if record.distributed:
        for task in TaskStore(engine).failed(run_id, errors_limit):
            failed_step = _result(task).failed_migration
            summary.errors.append(FleetFailure(task.clerk_id, failed_step, task.error or ""))
    else:
        summary.errors = [
            FleetFailure(clerk_id, migration, error or "")
            for _user_id, clerk_id, migration, error in RunStore(engine).failures(run_id)
        ]
    return summary
