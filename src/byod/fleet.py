"""All users: select, migrate (or undo a run) with a bounded pool, in waves, recorded.

Selection is keyset-paged (never every row in memory) and fed to at most
``concurrency`` workers, so memory stays flat as the fleet grows. Transient failures
(unreachable, timeout, busy) are retried with exponential backoff and jitter; a
migration's own error is not. A canary wave and a failure ratio can halt a run; the users
it never started are counted ``not_started``, nothing is left half-done. Every run is
recorded in ``byod_runs`` and its ledger rows carry its id. The core emits typed events;
it never prints.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    Executor,
    Future,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import asdict, dataclass, field

from byod._step import FleetError, Settled, control_plane_patience, settle
from byod._workers import ProcessPool, WorkerSetup, in_worker
from byod.clock import utcnow
from byod.controlplane import (
    RunCounts,
    RunStore,
    User,
    count_not_eligible,
    count_outdated_by_key,
    iter_outdated,
)
from byod.errors import (
    ByodError,
    ControlPlaneError,
    CredentialsError,
    InputError,
    IrreversibleError,
)
from byod.notify import log_notice
from byod.runner import Runner, UserResult

__all__ = [
    "DEFAULT_CONCURRENCY",
    "ELIGIBLE_STATUSES",
    "FleetError",
    "FleetEvent",
    "FleetOptions",
    "FleetStarted",
    "FleetSummary",
    "Selection",
    "SelectionSize",
    "UserFinished",
    "migrate_fleet",
    "rollback_run",
    "size_selection",
]

log = logging.getLogger("byod.fleet")
ELIGIBLE_STATUSES = ("connected", "error")
#: How often a running fleet run writes its counts (what watchers and dashboards see).
PROGRESS_SECONDS = 2.0
#: Instances are mostly waited on (network, disk), so a few per core.
DEFAULT_CONCURRENCY = min(32, 4 * (os.cpu_count() or 2))
#: How long a run's last write (its end state and counts) waits for a control plane out
#: of reach before the run gives up recording it.
FINISH_PATIENCE_SECONDS = 60.0


@dataclass(frozen=True)
class FleetOptions:
    """How a fleet run goes: how wide, how patient, when to stop."""

    concurrency: int = DEFAULT_CONCURRENCY
    retries: int = 2
    retry_base_seconds: float = 0.5
    retry_cap_seconds: float = 30.0
    canary: int = 0
    max_failure_ratio: float | None = None
    timeout: float | None = None
    #: short, renewed every third while a user is worked on: a dead runner's users come
    #: back within this many seconds
    lease_seconds: float = 30.0
    #: >1: that many worker processes, one user each at a time, instead of threads
    #: (for CPU-bound fleets such as local SQLite files: Python threads share one core)
    processes: int = 1

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise InputError("--concurrency must be at least 1")
        if self.processes < 1:
            raise InputError("--processes must be at least 1")
        if self.retries < 0 or self.canary < 0:
            raise InputError("--retries and --canary cannot be negative")
        if self.max_failure_ratio is not None and not 0 <= self.max_failure_ratio <= 1:
            raise InputError("--max-failure-ratio must be between 0 and 1")
        if self.timeout is not None and self.timeout <= 0:
            raise InputError("--timeout must be positive")
        if self.lease_seconds <= 0:
            raise InputError("--lease-seconds must be positive")

    def backoff(self, attempt: int) -> float:
        """Seconds before retry ``attempt`` (0-based): exponential, capped, half jittered."""
        ceiling = min(self.retry_cap_seconds, self.retry_base_seconds * 2.0**attempt)
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))


@dataclass(frozen=True)
class Selection:
    """Which users a fleet run considers (default: every eligible outdated user).

    ``users`` are byod ids, resolved from outside input once, at the edge."""

    users: tuple[int, ...] | None = None
    only_version: int | None = None
    limit: int | None = None


@dataclass(frozen=True)
class FleetStarted:
    """A fleet run starts on (about) ``total`` users."""

    run_id: str
    total: int


@dataclass(frozen=True)
class UserFinished:
    """One user is done: ``outcome`` is succeeded, failed, busy, up_to_date or
    not_eligible (see :data:`byod._step.OUTCOMES`); ``tries`` made. Every user a run
    takes ends with exactly one (except ``not_started`` ones)."""

    result: UserResult
    outcome: str
    tries: int


FleetEvent = FleetStarted | UserFinished


@dataclass
class FleetSummary:
    """What a fleet run did; it never claims more than happened.

    ``busy``: users another runner was working on (their lease was held). ``up_to_date``:
    selected users that needed nothing by the time their turn came. ``not_started``:
    users left when the run halted or was interrupted. ``not_eligible``: users with no
    config or a ``pending``/``disconnected`` connection, never touched (not in ``total``).
    """

    run_id: str = ""
    state: str = "running"
    halt_reason: str | None = None
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    busy: int = 0
    up_to_date: int = 0
    not_started: int = 0
    not_eligible: int = 0
    errors: list[FleetError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no user failed and the run went to its end."""
        return self.failed == 0 and self.not_started == 0 and self.state == "completed"

    def counts(self) -> RunCounts:
        """The counts, as the run record keeps them."""
        return RunCounts(**{name: getattr(self, name) for name in RunCounts.__dataclass_fields__})

    def as_dict(self) -> dict[str, object]:
        """The summary as plain data (for JSON)."""
        data = asdict(self)
        data["errors"] = [asdict(e) for e in self.errors]
        return data


@dataclass(frozen=True)
class _Item:
    user: User
    to_version: int


def migrate_fleet(
    runner: Runner,
    *,
    options: FleetOptions = FleetOptions(),
    selection: Selection = Selection(),
    to_version: int | None = None,
    on_event: Callable[[FleetEvent], None] = lambda event: None,
    started_by: str | None = None,
) -> FleetSummary:
    """Migrate every eligible user below the target (default: head) and summarise.

    Eligible: a config whose connection is ``connected`` or ``error`` (an instance that
    was unreachable is tried again). One failing user never stops the others, unless a
    canary or the failure ratio halts the run. Ctrl-C stops starting new users, lets
    running ones finish, and counts the rest as not started.
    """
    size = size_selection(runner, selection, to_version)
    target = size.target
    summary = FleetSummary(not_eligible=size.not_eligible, up_to_date=size.up_to_date)
    chosen: Iterable[_Item]
    if size.listed is not None:
        chosen = [_Item(user, target) for user in size.listed]
    else:
        chosen = _outdated(runner, target, selection.only_version, options)
    if selection.limit is not None:
        chosen = _limited(chosen, selection.limit)
    total = size.planned
    summary.total = summary.up_to_date
    record = {**asdict(options), **asdict(selection), "to_version": target}
    return _execute(
        runner,
        chosen,
        "migrate",
        record,
        summary,
        total,
        options,
        on_event,
        "migrate",
        target_version=target,
        started_by=started_by,
    )


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
    store.get(run_id)  # raises for an unknown run
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
    _require_key(runner, len(moved), sealed_here)
    if blocked:
        listed = ", ".join(f"{mid} (for {n} users)" for mid, n in sorted(blocked.items()))
        raise IrreversibleError(
            f"cannot undo run {run_id}: {listed} has no down; nothing was changed"
        )
    items = [_Item(User(u.user_id, u.clerk_id), u.version_before) for u in moved]
    record = {**asdict(options), "undoes": run_id}
    return _execute(
        runner,
        items,
        "rollback",
        record,
        FleetSummary(),
        len(items),
        options,
        on_event,
        "rollback",
        undoes=run_id,
    )


def _outdated(
    runner: Runner, target: int, only_version: int | None, options: FleetOptions
) -> Iterator[_Item]:
    """The outdated users, page by page; a control plane out of reach while reading the
    next page is waited for (as long as one user would wait), then the read goes on
    after the last user handed out."""
    started = utcnow()
    after = (-1, -1)
    failing_since: float | None = None
    while True:
        try:
            for row in iter_outdated(
                runner.engine,
                target,
                statuses=ELIGIBLE_STATUSES,
                untouched_since=started,
                only_version=only_version,
                after=after,
            ):
                after, failing_since = (row.schema_version, row.user_id), None
                yield _Item(User(row.user_id, row.clerk_id), target)
            return
        except ControlPlaneError as exc:
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since > control_plane_patience(options):
                raise
            log.warning("fleet: cannot read the next users: %s; trying again", exc.message)
            time.sleep(0.5)


@dataclass(frozen=True)
class SelectionSize:
    """A selection sized before a run starts (never more than counts in memory, except
    ``--users``, which is resolved up front so an unknown user is bad input at once)."""

    target: int
    #: users the run will take (at most ``--limit``)
    planned: int
    #: users with no config or a ``pending``/``disconnected`` connection
    not_eligible: int
    #: ``--users`` already at the target
    up_to_date: int
    #: ``--users`` still to run; None: the outdated users of the index
    listed: tuple[User, ...] | None


def size_selection(
    runner: Runner, selection: Selection, to_version: int | None = None
) -> SelectionSize:
    """The target (default head; an unknown one is bad input) and the selection's size."""
    target = runner.registry.head if to_version is None else to_version
    runner.registry.plan_up(0, target)
    if selection.users is None:
        listed = None
        not_eligible = count_not_eligible(runner.engine, ELIGIBLE_STATUSES)
        up_to_date = 0
        planned, sealed_here = count_outdated_by_key(
            runner.engine,
            target,
            statuses=ELIGIBLE_STATUSES,
            only_version=selection.only_version,
            key_id=runner.sealer.key_id,
        )
    else:
        listed, not_eligible, up_to_date, sealed_here = _listed(runner, selection.users, target)
        planned = len(listed)
    if selection.limit is not None:
        planned = min(planned, selection.limit)
    _require_key(runner, planned, sealed_here)
    return SelectionSize(target, planned, not_eligible, up_to_date, listed)


def _require_key(runner: Runner, planned: int, sealed_here: int) -> None:
    """Refuse a run whose key opens none of its users (the operator's mistake, not the
    users'): before the run is recorded, before any lease, no user's status touched."""
    if planned and not sealed_here:
        raise CredentialsError(
            f"none of the {planned} selected users' credentials were sealed with the "
            f"configured key (key id {runner.sealer.key_id}): wrong encryption key; "
            "no run was started and nothing was changed"
        )


def _listed(
    runner: Runner, user_ids: tuple[int, ...], target: int
) -> tuple[tuple[User, ...], int, int, int]:
    """``--users`` looked up: those to run, how many are not eligible, how many are at
    ``target`` already, and how many of those to run were sealed with the key in use."""
    users: list[User] = []
    not_eligible = up_to_date = sealed_here = 0
    for user in dict.fromkeys(runner.directory.get_user(uid) for uid in user_ids):
        try:
            config = runner.directory.get_config(user.id)
        except ByodError:
            not_eligible += 1
            continue
        if config.connection_status not in ELIGIBLE_STATUSES:
            not_eligible += 1
        elif config.schema_version >= target:
            up_to_date += 1
        else:
            users.append(user)
            sealed_here += config.key_id == runner.sealer.key_id
    return tuple(users), not_eligible, up_to_date, sealed_here


def _limited(items: Iterable[_Item], limit: int) -> Iterator[_Item]:
    for count, item in enumerate(items):
        if count >= limit:
            return
        yield item


def _execute(
    base: Runner,
    items: Iterable[_Item],
    kind: str,
    record: dict[str, object],
    summary: FleetSummary,
    total: int,
    options: FleetOptions,
    on_event: Callable[[FleetEvent], None],
    action: str,
    *,
    target_version: int | None = None,
    undoes: str | None = None,
    started_by: str | None = None,
) -> FleetSummary:
    store = RunStore(base.engine)
    summary.run_id = store.start(
        kind, record, target_version=target_version, undoes=undoes, started_by=started_by
    )
    runner = base.configured(
        run_id=summary.run_id, timeout=options.timeout, lease_seconds=options.lease_seconds
    )
    store.progress(summary.run_id, summary.counts(), planned=total + summary.total)
    on_event(FleetStarted(summary.run_id, total + summary.total))
    return _FleetRun(runner, store, summary, options, on_event, action).run(iter(items))


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
    ) -> None:
        self.runner = runner
        self.store = store
        self.summary = summary
        self.options = options
        self.on_event = on_event
        self.action = action
        self.stop = threading.Event()  # no new retries, no new users
        self.in_flight: dict[Future[Settled], _Item] = {}
        # threads in one process, or single-user worker processes
        self.workers = options.concurrency if options.processes == 1 else options.processes

    def run(self, remaining: Iterator[_Item]) -> FleetSummary:
        summary = self.summary
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
                    self._collect(ALL_COMPLETED)
                    summary.not_started += sum(1 for _ in remaining)
        except ByodError as exc:  # e.g. the selection unreadable for too long
            summary.state, summary.halt_reason = "interrupted", exc.message
            raise
        finally:
            self.stop.set()
            finished.set()
            ticker.join()
            if summary.state == "running":
                summary.state = "completed"
            summary.total += summary.not_started
            self._record_end()
        return summary

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
        )
        # spawn, not fork: a forked child would inherit open database connections
        return ProcessPool(self.options.processes, setup)

    def _feed(self, pool: Executor, remaining: Iterator[_Item]) -> None:
        summary, canary = self.summary, self.options.canary
        submitted = 0
        for item in remaining:
            if canary and submitted == canary and summary.state == "running":
                self._collect(ALL_COMPLETED)
                if summary.failed:
                    self._halt(f"a canary failed ({summary.failed} of {canary})")
            while summary.state == "running" and len(self.in_flight) >= self.workers:
                self._collect(FIRST_COMPLETED)
            if summary.state != "running":
                summary.not_started += 1
                continue
            if isinstance(pool, ProcessPool):
                future = pool.submit(in_worker, self.action, item.user, item.to_version)
            else:
                future = pool.submit(
                    settle,
                    self.runner,
                    self.action,
                    item.user,
                    item.to_version,
                    self.options,
                    self.stop,
                )
            self.in_flight[future] = item
            submitted += 1
        self._collect(ALL_COMPLETED)
        if canary and summary.failed and submitted <= canary:
            self._halt(f"a canary failed ({summary.failed} of {submitted})")

    def _collect(self, return_when: str) -> None:
        done, _ = wait(self.in_flight, return_when=return_when)
        for future in done:
            self._finish(future)
            self._check_ratio()

    def _finish(self, future: Future[Settled]) -> None:
        summary = self.summary
        self.in_flight.pop(future)
        settled = future.result()
        summary.total += settled.outcome != "not_eligible"
        setattr(summary, settled.outcome, getattr(summary, settled.outcome) + 1)
        if settled.error is not None:
            summary.errors.append(settled.error)
        if settled.result is not None:
            self.on_event(UserFinished(settled.result, settled.outcome, settled.tries))

    def _halt(self, reason: str) -> None:
        if self.summary.state == "running":
            log.warning("fleet run %s halted: %s", self.summary.run_id, reason)
            self.summary.state, self.summary.halt_reason = "halted", reason
            self.stop.set()

    def _check_ratio(self) -> None:
        summary, ratio = self.summary, self.options.max_failure_ratio
        done = summary.succeeded + summary.failed
        if ratio is not None and done and summary.failed / done > ratio:
            self._halt(f"{summary.failed} of {done} failed, above --max-failure-ratio {ratio}")


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
