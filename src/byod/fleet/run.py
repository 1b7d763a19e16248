"""All users: migrate (or undo a run) with a bounded pool, in waves, recorded.

Users are streamed from the selection into at most ``concurrency`` workers (threads, or
spawned processes), so memory stays flat as the fleet grows. Transient failures
(unreachable, timeout, busy) are retried with exponential backoff and jitter; a
migration's own error is not. A canary wave and a failure ratio can halt a run
(:mod:`byod.fleet.halt`); the users it never started are counted ``not_started``,
nothing is left half-done. Every run is recorded in ``byod_runs`` and its ledger rows
carry its id. The core emits typed events; it never prints.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ThreadPoolExecutor,
    wait,
)

from byod.controlplane import RunStore, User, refuse_drift_up_front
from byod.controlplane.rehearsals import record_rehearsed
from byod.errors import ByodError, ControlPlaneError, InputError, IrreversibleError
from byod.fleet.halt import canary_over, canary_room, halt_reason
from byod.fleet.outcome import Settled, settle
from byod.fleet.paging import Pager
from byod.fleet.pools import ProcessPool, WorkerSetup, in_worker
from byod.fleet.selection import Item, limited, outdated, require_key, size_selection
from byod.fleet.summary import FleetEvent, FleetStarted, FleetSummary, UserFinished
from byod.logs import fields
from byod.notify import log_notice
from byod.phased import Batching
from byod.runner import Runner
from byod.runner.pages import Claims, Handed, Outcomes
from byod.spec import FleetOptions, RunSpec, Selection

__all__ = ["migrate_fleet", "rollback_run"]

log = logging.getLogger("byod.fleet")
#: How often a running fleet run writes its counts (what watchers and dashboards see).
PROGRESS_SECONDS = 2.0
#: How long a run's last write (its end state and counts) waits for a control plane out
#: of reach before the run gives up recording it.
FINISH_PATIENCE_SECONDS = 60.0


def migrate_fleet(
    runner: Runner,
    *,
    options: FleetOptions = FleetOptions(),
    selection: Selection = Selection(),
    to_version: int | None = None,
    on_event: Callable[[FleetEvent], None] = lambda event: None,
    started_by: str | None = None,
    rehearse: bool = False,
) -> FleetSummary:
    """Migrate every eligible user below the target (default: head) and summarise;
    ``rehearse``: rehearse each instead (see :func:`byod.rehearsal.rehearse_user`), a run of kind
    ``rehearse`` whose users' outcomes are kept apart from the ledger.

    Eligible: a config whose connection is ``connected`` or ``error`` (an instance that
    was unreachable is tried again). One failing user never stops the others, unless a
    canary or the failure ratio halts the run. Ctrl-C stops starting new users, lets
    running ones finish, and counts the rest as not started.
    """
    refuse_drift_up_front(runner.engine, runner.registry)
    size = size_selection(runner, selection, to_version)
    target = size.target
    summary = FleetSummary(
        not_eligible=size.not_eligible, up_to_date=size.up_to_date, rehearsal=rehearse
    )
    chosen: Iterable[Item]
    if size.listed is not None:
        chosen = [Item(user, target) for user in size.listed]
    else:
        chosen = outdated(runner, target, selection.only_version, options)
    if selection.limit is not None:
        chosen = limited(chosen, selection.limit)
    total = size.planned
    summary.total = summary.up_to_date
    spec = RunSpec(options=options, selection=selection, to_version=target)
    action = "rehearse" if rehearse else "migrate"
    return _execute(runner, chosen, action, spec, summary, total, on_event, started_by)


def rollback_run(
    runner: Runner,
    run_id: str,
    *,
    options: FleetOptions = FleetOptions(),
    on_event: Callable[[FleetEvent], None] = lambda event: None,
) -> FleetSummary:
    """Undo what one fleet run moved: each user it moved back to its version before.

    Refuses with :class:`IrreversibleError`, before touching anything, when a migration
    it would undo has no ``down``. Users the run did not move are never touched.
    """
    store = RunStore(runner.engine)
    if store.get(run_id).kind == "rehearse":  # raises for an unknown run
        raise InputError(f"run {run_id} was a rehearsal: it changed nothing, so nothing to undo")
    refuse_drift_up_front(runner.engine, runner.registry)
    moved = store.moved_users(run_id)
    blocked: dict[str, int] = {}
    sealed_here = 0
    for user in moved:
        config = runner.directory.get_config(user.user_id)
        sealed_here += config.key_id == runner.sealer.key_id
        current = config.schema_version
        if current <= user.version_before:
            continue
        for step in runner.registry.plan_down(current, user.version_before).steps:
            if not step.migration.reversible:
                blocked[step.migration.id] = blocked.get(step.migration.id, 0) + 1
    require_key(runner, len(moved), sealed_here)
    if blocked:
        listed = ", ".join(f"{mid} (for {n} users)" for mid, n in sorted(blocked.items()))
        raise IrreversibleError(
            f"cannot undo run {run_id}: {listed} has no down; nothing was changed"
        )
    items = [Item(User(u.user_id, u.clerk_id), u.version_before) for u in moved]
    spec = RunSpec(options=options, undoes=run_id)
    return _execute(runner, items, "rollback", spec, FleetSummary(), len(items), on_event, None)


def _execute(
    base: Runner,
    items: Iterable[Item],
    action: str,
    spec: RunSpec,
    summary: FleetSummary,
    total: int,
    on_event: Callable[[FleetEvent], None],
    started_by: str | None,
) -> FleetSummary:
    """Record the run (``action``: migrate or rollback), then run its users."""
    store = RunStore(base.engine)
    summary.run_id = store.start(
        action, spec, started_by=started_by, planned=total + summary.total, counts=summary.counts()
    )
    options = spec.options
    stop = threading.Event()  # Ctrl-C: no new users, no new retries, no new batches
    runner = base.configured(
        run_id=summary.run_id,
        timeout=options.timeout,
        lease_seconds=options.lease_seconds,
        batching=Batching.of(options, stop),
        on_rows=on_event,
    )
    if action != "rehearse":  # a rehearsal's users each keep one transaction of their own
        runner.claims = Claims(
            runner.directory, runner.ledger, runner.owner, runner.run_id, runner.lease_seconds
        )
        runner.outcomes = Outcomes(runner.ledger)
    on_event(FleetStarted(summary.run_id, total + summary.total))
    fleet_run = _FleetRun(runner, store, summary, options, on_event, action, stop)
    return fleet_run.run(iter(items))


class _FleetRun:
    """One fleet run in progress: the pool, the waves, the halts, the counts."""

    def __init__(
        self,
        runner: Runner,
        store: RunStore,
        summary: FleetSummary,
        options: FleetOptions,
        on_event: Callable[[FleetEvent], None],
        action: str,
        stop: threading.Event,
    ) -> None:
        self.runner = runner
        self.store = store
        self.summary = summary
        self.options = options
        self.on_event = on_event
        self.action = action
        self.stop = stop
        self.in_flight: dict[Future[tuple[Settled, Handed | None]], Item] = {}
        self.waiting: Item | None = None
        self.submitted = 0  # users started
        # threads in one process, or single-user worker processes
        self.workers = options.concurrency if options.processes == 1 else options.processes

    def run(self, selected: Iterator[Item]) -> FleetSummary:
        summary = self.summary
        remaining: Iterator[Item] = selected
        claims = self.runner.claims
        if claims is not None:
            remaining = Pager(
                self.runner,
                claims,
                selected,
                action=self.action,
                workers=self.workers,
                room=lambda: canary_room(self.options, self.submitted, len(self.in_flight)),
            )
        finished = threading.Event()
        ticker = threading.Thread(
            target=_report_progress,
            args=(self.store, summary, finished),
            name="byod-progress",
            daemon=True,
        )
        ticker.start()
        try:
            with self._pool() as pool:
                try:
                    self._feed(pool, remaining)
                except KeyboardInterrupt:
                    summary.state = "interrupted"
                    self.stop.set()
                    log.warning("fleet run %s interrupted: finishing running users", summary.run_id)
                    self._drain()
                    summary.not_started += self._left(remaining, self.waiting)
        except ByodError as exc:  # e.g. the selection unreadable for too long
            summary.state, summary.halt_reason = "interrupted", exc.message
            raise
        finally:
            self.stop.set()
            self._close_pages()
            finished.set()
            ticker.join()
            if summary.state == "running":
                summary.state = "completed"
            summary.total += summary.not_started
            self._explain_holds()
            self._record_end()
        return summary

    def _left(self, remaining: Iterator[Item], taken: Item | None) -> int:
        """The users the run will not start (``taken``: handed out, never started):
        their page's claims given back; how many, the selection's rest counted too."""
        self.waiting = None
        if isinstance(remaining, Pager):
            return remaining.left(taken)
        return (taken is not None) + sum(1 for _ in remaining)

    def _close_pages(self) -> None:
        """Claims no worker took given back; the last steps still waiting recorded
        (patiently: the next run restores from the stamps what never is)."""
        runner = self.runner
        try:
            if runner.claims is not None:
                runner.claims.release_all()
        except ByodError as exc:  # their leases lapse; their rows are settled next run
            log.warning("fleet: unstarted users not given back: %s", exc.message)
        finally:
            if runner.outcomes is not None:
                runner.outcomes.close(FINISH_PATIENCE_SECONDS)

    def _explain_holds(self) -> None:
        """What holds each gate that stopped users, as the run leaves the fleet (a user
        held early was told before the others moved)."""
        direction = "down" if self.action == "rollback" else "up"
        for held in self.summary.held:
            with contextlib.suppress(ByodError):  # the reason each user was given stands
                held.reason = self.runner.gates.explain(held.migration, direction)

    def _record_end(self) -> None:
        """The run's end state and real counts, waiting a while for a control plane out
        of reach: a short outage must not leave the run ``running`` with stale counts."""
        summary = self.summary
        give_up = time.monotonic() + FINISH_PATIENCE_SECONDS
        delay = 0.2
        while True:
            try:
                self.store.finish(
                    summary.run_id, summary.counts(), summary.state, summary.halt_reason
                )
                return
            except ControlPlaneError as exc:
                if time.monotonic() + delay > give_up:
                    raise
                log.warning("fleet: cannot record the run's end: %s; trying again", exc.message)
                time.sleep(delay)
                delay = min(5.0, delay * 2)

    def _pool(self) -> Executor:
        if self.options.processes == 1:
            return ThreadPoolExecutor(self.options.concurrency, thread_name_prefix="byod")
        runner = self.runner
        if runner.registry.source is None:
            raise InputError("--processes needs a migrations folder (not an in-memory registry)")
        setup = WorkerSetup(
            control_plane=runner.engine.url.render_as_string(hide_password=False),
            migrations=str(runner.registry.source),
            key=runner.sealer.key,
            run_id=self.summary.run_id,
            options=self.options,
            owner=runner.owner,
            notify_hook=_hook_spec(runner.notify),
            policy=runner.policy,
            keep_alembic_version=runner.registry.keep_alembic_version,
            paged=runner.claims is not None,
        )
        # spawn, not fork: a forked child would inherit open database connections
        return ProcessPool(self.options.processes, setup)

    def _feed(self, pool: Executor, remaining: Iterator[Item]) -> None:
        summary, options = self.summary, self.options
        for item in remaining:
            self.waiting = item  # taken from the selection, not submitted yet
            if canary_room(options, self.submitted, len(self.in_flight)) == 0:
                self._drain()  # the canary wave ends before anyone else starts
                self._check_halt(started=self.submitted, canary_over=True)
            while summary.state == "running" and len(self.in_flight) >= self.workers:
                self._collect()
            if summary.state != "running":
                summary.not_started += self._left(remaining, item)
                break
            if isinstance(pool, ProcessPool):
                claims = self.runner.claims
                claimed = None if claims is None else claims.take(item.user.id)
                future = pool.submit(in_worker, self.action, item.user, item.to_version, claimed)
            else:
                future = pool.submit(
                    _in_thread,
                    self.runner,
                    self.action,
                    item.user,
                    item.to_version,
                    self.options,
                    self.stop,
                )
            self.in_flight[future] = item
            self.waiting = None
            self.submitted += 1
        self._drain()
        over = canary_over(options, self.submitted, 0, exhausted=True)
        self._check_halt(started=self.submitted, canary_over=over)

    def _drain(self) -> None:
        """Wait for every user in flight, settling each as it finishes (so the run's counts,
        events and log lines move with them, not all at the end)."""
        while self.in_flight:
            self._collect()

    def _collect(self) -> None:
        done, _ = wait(self.in_flight, return_when=FIRST_COMPLETED)
        for future in done:
            self._finish(future)
            self._check_halt(started=0, canary_over=False)

    def _finish(self, future: Future[tuple[Settled, Handed | None]]) -> None:
        summary = self.summary
        self.in_flight.pop(future)
        settled, handed = future.result()
        if handed is not None and self.runner.outcomes is not None:  # a worker process's
            self.runner.outcomes.take_over(handed, self.runner.registry)
        summary.total += settled.outcome != "not_eligible"
        setattr(summary, settled.outcome, getattr(summary, settled.outcome) + 1)
        if settled.error is not None:
            summary.errors.append(settled.error)
        if settled.result is not None and settled.result.held is not None:
            summary.hold(*settled.result.held)
        _log_outcome(summary.run_id, settled)
        if self.action == "rehearse" and settled.result is not None:
            _keep_rehearsal(self.runner, summary.run_id, settled)
        if settled.result is not None:
            self.on_event(UserFinished(settled.result, settled.outcome, settled.tries))

    def _check_halt(self, *, started: int, canary_over: bool) -> None:
        summary = self.summary
        reason = halt_reason(
            self.options,
            succeeded=summary.succeeded,
            failed=summary.failed,
            started=started,
            canary_over=canary_over,
        )
        if reason is not None and summary.state == "running":
            log.warning("fleet run %s halted: %s", summary.run_id, reason)
            summary.state, summary.halt_reason = "halted", reason
            self.stop.set()


def _keep_rehearsal(runner: Runner, run_id: str, settled: Settled) -> None:
    """A rehearsed user's outcome, where ``runs show`` finds it (never in the ledger)."""
    result = settled.result
    assert result is not None
    error = result.error
    try:
        record_rehearsed(
            runner.engine,
            run_id,
            result.user_id,
            outcome=settled.outcome,
            versions=(result.from_version, result.to_version),
            steps=[(step.migration_id, step.status) for step in result.steps],
            error=None if error is None else (type(error).__name__, error.message),
            tries=settled.tries,
            seconds=result.seconds,
        )
    except ControlPlaneError as exc:  # the run's counts still say it
        log.warning("user %s: rehearsal outcome not kept: %s", result.user_id, exc.message)


def _in_thread(
    runner: Runner,
    action: str,
    user: User,
    to_version: int,
    options: FleetOptions,
    stop: threading.Event,
) -> tuple[Settled, None]:
    """Run one user on a thread of the run's pool (its last step recorded by the run's
    own batches: nothing to hand back, unlike a worker process's)."""
    return settle(runner, action, user, to_version, options, stop), None


def _log_outcome(run_id: str, settled: Settled) -> None:
    """One record per user of the run: how it ended, after how many tries."""
    result, user = settled.result, settled.user
    error = None if result is None or result.error is None else result.error
    log.log(
        logging.INFO if settled.outcome in ("succeeded", "up_to_date") else logging.WARNING,
        "user %s (%s): %s after %d tries",
        user.id,
        user.clerk_id,
        settled.outcome,
        settled.tries,
        extra=fields(
            run_id=run_id,
            user_id=user.id,
            clerk_id=user.clerk_id,
            migration=None if result is None else result.failed_migration,
            attempt=settled.tries,
            duration_ms=None if result is None else round(result.seconds * 1000, 1),
            outcome=settled.outcome,
            error=None if error is None else type(error).__name__,
        ),
    )


def _hook_spec(notify: Callable[..., None]) -> str | None:
    """How a worker process finds the same notification hook (``module:function``)."""
    if notify is log_notice:
        return None
    qualname = getattr(notify, "__qualname__", "<?>")
    if "<" in qualname:
        raise InputError("--processes needs a notification hook importable as module:function")
    return f"{notify.__module__}:{qualname}"


def _report_progress(store: RunStore, summary: FleetSummary, stop: threading.Event) -> None:
    """Write the run's counts every few seconds, so others can watch it and see it alive."""
    while not stop.wait(PROGRESS_SECONDS):
        try:
            store.progress(summary.run_id, summary.counts())
        except ByodError as exc:
            log.warning("fleet: cannot record progress: %s", exc.message)
