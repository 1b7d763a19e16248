"""A distributed run's dispatch policy: how many users to hand out and when, when to halt
(the fleet's own policy, :func:`byod.fleet.halt.halt_reason`), and publishing the tasks.

Its bookkeeping is the control plane's (:class:`~byod.controlplane.RunStore` and
:class:`~byod.controlplane.TaskStore`): each step is one short statement or transaction,
so any process on any machine can do its part: the one that starts the run, every
worker, every watcher. The per-run cap on tasks in flight is kept by handing users out
in keyset pages only as tasks finish (:meth:`Dispatcher.top_up`), never all at once.
PostgreSQL only: workers on many machines cannot share a SQLite file.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import sqlalchemy as sa

from byod.controlplane import Claim, DispatchRow, RunStore, TaskEnd, TaskStore
from byod.errors import ByodError, ControlPlaneError, SettingsError
from byod.fleet import Settled
from byod.fleet.halt import canary_over, canary_room, halt_reason
from byod.registry import Registry
from byod.results import steps_to_json
from byod.settings import safe_url

__all__ = [
    "MAX_TASK_PAGE",
    "PAGES_IN_FLIGHT",
    "Broker",
    "Dispatcher",
    "Publisher",
    "TaskMessage",
    "in_pages",
    "registry_digest",
    "require_server_control_plane",
]

log = logging.getLogger("byod.distributed")


@dataclass(frozen=True)
class TaskMessage:
    """A page of one run's users (one task), to be sent to the workers consuming
    ``queue`` (None: the default queue); every user of a page is of that queue."""

    run_id: str
    user_ids: tuple[int, ...]
    queue: str | None


#: A run keeps this many tasks in flight where it has the users for them, so that many
#: worker processes stay busy: a task's page is the users in flight divided by it (a
#: fleet smaller than that: one user a task), at most :data:`MAX_TASK_PAGE`.
PAGES_IN_FLIGHT = 32
#: The most users one task carries.
MAX_TASK_PAGE = 64


def task_page_size(in_flight: int) -> int:
    """How many users one task carries, with this many of the run's users in flight."""
    return max(1, min(MAX_TASK_PAGE, in_flight // PAGES_IN_FLIGHT))


def in_pages(run_id: str, users: Sequence[tuple[int, str | None]], size: int) -> list[TaskMessage]:
    """``(user, queue)`` pairs as tasks of at most ``size`` users, each of one queue."""
    by_queue: dict[str | None, list[int]] = {}
    for user_id, queue in users:
        by_queue.setdefault(queue, []).append(user_id)
    return [
        TaskMessage(run_id, tuple(ids[start : start + size]), queue)
        for queue, ids in by_queue.items()
        for start in range(0, len(ids), size)
    ]


#: Sends task messages to the broker.
Publisher = Callable[[Sequence[TaskMessage]], None]


class Broker(Protocol):
    """What the core needs of a task queue; the Celery adapter (:mod:`byod.taskqueue`)
    supplies one, and front ends hand it to the workspace."""

    def publish(self, messages: Sequence[TaskMessage]) -> None:
        """Send each message to its user's queue; :class:`BrokerError` if it cannot."""

    def check(self) -> None:
        """Raise :class:`BrokerError` unless the broker answers."""


def require_server_control_plane(engine: sa.Engine) -> None:
    """Refuse a control plane that workers on other machines cannot share."""
    if engine.dialect.name != "postgresql":
        raise SettingsError(
            f"distributed runs need a PostgreSQL control plane, not {engine.dialect.name} "
            f"({safe_url(engine.url)}): workers on other machines cannot share it",
            hint="Set BYOD_DATABASE_URL to a PostgreSQL database every worker can reach, "
            "run `byod init`, or run without a broker (drop BYOD_BROKER_URL / --distributed).",
        )


def registry_digest(registry: Registry) -> str:
    """A short fingerprint of the migrations (ids and checksums): a worker whose folder
    differs from the run's must not run its users."""
    text = "\n".join(f"{m.id}:{m.checksum}" for m in registry)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Dispatcher:
    """Hands a distributed run's users to the task queue and keeps its books."""

    def __init__(self, engine: sa.Engine, publish: Publisher) -> None:
        require_server_control_plane(engine)
        self.engine = engine
        self.publish = publish
        self.runs = RunStore(engine)
        self.tasks = TaskStore(engine)

    def top_up(self, run_id: str) -> int:
        """Hand out the run's next users while it is under its cap on tasks in flight;
        halt it when a canary failed or failures pass the ratio; close it when nothing is
        left. Returns how many tasks were sent. Safe to call from anywhere, any time: one
        caller at a time does the work, the others return at once."""
        handed, in_flight = self.runs.hand_out(run_id, _decide)
        if handed:
            self.publish(in_pages(run_id, handed, task_page_size(in_flight)))
        return len(handed)

    def resend_stale(
        self,
        run_id: str,
        older_than_seconds: float,
        lapsed_seconds: float | None = None,
        stalled_seconds: float | None = None,
    ) -> int:
        """Send again the run's tasks that look lost (a broker that lost its messages, a
        publish that failed, and, given the run's lease as ``lapsed_seconds``, a worker
        that died holding a user; given ``stalled_seconds``, a run stalled on messages a
        dead worker had taken: see :meth:`TaskStore.send_again`). A duplicate is
        harmless (it finds the task done, or waits for its twin). Returns how many."""
        lost = self.tasks.send_again(run_id, older_than_seconds, lapsed_seconds, stalled_seconds)
        if lost:
            log.warning("run %s: sending %d lost tasks again", run_id, len(lost))
            self.publish(in_pages(run_id, lost, MAX_TASK_PAGE))
        return len(lost)

    def claim(self, run_id: str, user_ids: Sequence[int], worker: str) -> dict[int, Claim]:
        """Take a page of users' tasks (a user without one, e.g. its run was deleted,
        is left out)."""
        return self.tasks.claim_page(run_id, user_ids, worker)

    def finish(self, run_id: str, settled: Sequence[Settled]) -> DispatchRow | None:
        """Record how a page of users' tasks ended and count them, then hand out more
        users (or halt or close the run) when that is due. Returns the run as the ends
        left it; None when none was recorded: an end recorded already (a duplicate
        delivery) is never counted twice."""
        run = self.tasks.finish_page(run_id, [(s.user.id, _task_end(s)) for s in settled])
        if run is None:
            return None
        if _top_up_due(run):
            try:
                self.top_up(run_id)
            except ControlPlaneError:
                raise  # the caller tries again later; its tasks then find themselves done
            except ByodError as exc:  # the ends are recorded; a watcher sends them later
                log.warning("run %s: cannot hand out more users now: %s", run_id, exc.message)
        return run

    def stop(self, run_id: str, state: str, reason: str) -> bool:
        """End a running run early (``interrupted`` or ``halted``): nothing more is handed
        out, queued tasks are discarded by the workers, running ones finish. False when
        the run was not running."""
        stopped = self.runs.stop(run_id, state, reason)
        self.top_up(run_id)  # closes it at once when nothing is in flight
        return stopped


def _task_end(settled: Settled) -> TaskEnd:
    result, error = settled.result, settled.error
    return TaskEnd(
        outcome=settled.outcome,
        to_version=None if result is None else result.to_version,
        error=None if error is None else error.error,
        error_type=None if result is None or result.error is None else type(result.error).__name__,
        steps=None if result is None else steps_to_json(result.steps),
        tries=settled.tries,
        seconds=None if result is None else result.seconds,
    )


def _decide(run: DispatchRow) -> tuple[str | None, int]:
    """Why the run must halt now (or None), and how many users to hand out now."""
    return (_halt(run) if run.state == "running" else None), _room(run)


def _halt(run: DispatchRow) -> str | None:
    options = run.spec.options
    return halt_reason(
        options,
        succeeded=run.succeeded,
        failed=run.failed,
        started=run.dispatched,
        canary_over=canary_over(options, run.dispatched, run.in_flight, run.exhausted),
    )


def _top_up_due(run: DispatchRow) -> bool:
    """Whether a run, just after one of its tasks ended, needs a top-up: room for a
    batch of users, a halt to make, or an end to record."""
    if run.in_flight == 0:
        return True
    if run.state == "running" and _halt(run) is not None:
        return True
    return run.state == "running" and not run.exhausted and _room(run) > 0


def _room(run: DispatchRow) -> int:
    """How many users to hand out now."""
    options = run.spec.options
    cap, in_flight, dispatched = options.concurrency, run.in_flight, run.dispatched
    room = cap - in_flight
    wave = canary_room(options, dispatched, in_flight)
    if wave is not None:
        return min(room, wave)
    limit = run.spec.selection.limit
    if limit is not None:
        room = min(room, limit - dispatched)
    # refill in batches: a top-up is a transaction and a page query
    if in_flight and room < max(1, cap // 4):
        return 0
    return max(0, room)
