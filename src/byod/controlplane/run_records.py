"""What ``byod_runs`` and ``byod_run_tasks`` hold, as typed records (read side).

Their one writer is :mod:`byod.controlplane.runs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from byod.clock import utcnow
from byod.spec import RunCounts, RunSpec

__all__ = [
    "STALE_AFTER",
    "Claim",
    "DispatchRow",
    "FinishedTask",
    "MovedUser",
    "RunRecord",
    "TaskEnd",
]


#: A running run that has not written its progress for this long is taken as lost.
STALE_AFTER = timedelta(seconds=60)


@dataclass(frozen=True)
class RunRecord:
    """One fleet run as recorded."""

    id: str
    kind: str
    started_by: str
    spec: RunSpec
    state: str
    target_version: int | None
    undoes: str | None
    counts: RunCounts
    planned: int | None
    halt_reason: str | None
    started_at: datetime
    updated_at: datetime
    ended_at: datetime | None
    #: distributed runs: users handed to the task queue so far, and those not done yet
    dispatched: int = 0
    in_flight: int = 0

    @property
    def noop(self) -> bool:
        """A run that ended having moved (or tried, or left out) nobody: every user it
        took was up to date. Lists leave these out unless asked."""
        c = self.counts
        return (
            self.state == "completed"
            and not (c.succeeded or c.failed or c.busy)
            and (not c.not_started)
        )

    @property
    def distributed(self) -> bool:
        """True for a run whose users are migrated by task-queue workers."""
        return self.spec.distributed

    @property
    def remaining(self) -> int | None:
        """Users not finished yet (None while the size of the run is not known)."""
        if self.planned is None:
            return None
        c = self.counts
        return max(0, self.planned - c.done - c.not_started)

    @property
    def shown_state(self) -> str:
        """The state, with a long-silent ``running`` run shown as lost (a distributed run
        is never lost: its queued tasks wait for workers)."""
        if (
            self.state == "running"
            and not self.distributed
            and utcnow() - self.updated_at > STALE_AFTER
        ):
            return "interrupted"
        return self.state


@dataclass(frozen=True)
class MovedUser:
    """A user a run moved, and the version it had before."""

    user_id: int
    clerk_id: str
    version_before: int


@dataclass(frozen=True)
class DispatchRow:
    """A distributed run as its dispatch sees it (its row, with the spec parsed)."""

    run_id: str
    state: str
    spec: RunSpec
    target_version: int
    in_flight: int
    dispatched: int
    exhausted: bool
    succeeded: int
    failed: int


@dataclass(frozen=True)
class Claim:
    """What a worker learns when it takes a task: the run, the user, and whether to go."""

    run_state: str
    spec: RunSpec
    target_version: int
    clerk_id: str
    task_state: str  # before this claim: queued | running | done
    claimed: bool  # True: run the user; False: the run stopped, or the task is done


@dataclass(frozen=True)
class TaskEnd:
    """How one user's task ended, as its row keeps it (``outcome``: one of
    :data:`byod.spec.OUTCOMES`)."""

    outcome: str
    to_version: int | None = None
    error: str | None = None
    error_type: str | None = None
    steps: str | None = None
    tries: int = 0
    seconds: float | None = None


@dataclass(frozen=True)
class FinishedTask:
    """A distributed run's task as recorded done (``steps``: its steps as JSON)."""

    user_id: int
    clerk_id: str
    outcome: str
    tries: int
    from_version: int
    to_version: int | None
    error: str | None
    error_type: str | None
    steps: str
    seconds: float
    finished_at: datetime
