"""What a fleet run tells as it goes (typed events) and what it did (its summary)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from byod.fleet.outcome import FleetFailure
from byod.results import RowsProgress, UserResult
from byod.spec import RunCounts

__all__ = [
    "FleetEvent",
    "FleetStarted",
    "FleetSummary",
    "GateHeld",
    "RowsProgress",
    "UserFinished",
]


@dataclass(frozen=True)
class FleetStarted:
    """A fleet run starts on (about) ``total`` users."""

    run_id: str
    total: int


@dataclass(frozen=True)
class UserFinished:
    """One user is done: ``outcome`` is succeeded, failed, busy, up_to_date or
    not_eligible (see :data:`byod.spec.OUTCOMES`); ``tries`` made. Every user a run
    takes ends with exactly one (except ``not_started`` ones)."""

    result: UserResult
    outcome: str
    tries: int


#: What a fleet run tells as it goes; a backfill's batches (:class:`RowsProgress`) come
#: from the threads that run them, and only where users run in this process's threads
FleetEvent = FleetStarted | UserFinished | RowsProgress


@dataclass
class GateHeld:
    """Users a closed gate stopped before ``migration``: how many, and what holds it."""

    migration: str
    reason: str
    users: int = 0


@dataclass
class FleetSummary(RunCounts):
    """What a fleet run did; it never claims more than happened: its counts (the
    counters of :class:`~byod.spec.RunCounts`), state, why it halted, and the errors.

    ``busy``: users another runner was working on (their lease was held). ``up_to_date``:
    selected users that needed nothing by the time their turn came. ``not_started``:
    users left when the run halted or was interrupted. ``not_eligible``: users with no
    config or a ``pending``/``disconnected`` connection, never touched (not in ``total``).
    """

    run_id: str = ""
    state: str = "running"
    halt_reason: str | None = None
    errors: list[FleetFailure] = field(default_factory=list)
    #: a rehearsal: every instance was rolled back, nothing was changed
    rehearsal: bool = False
    #: the gates that stopped users, and what holds each
    held: list[GateHeld] = field(default_factory=list)

    def hold(self, migration_id: str, reason: str) -> None:
        """Count a user stopped before ``migration_id``'s gate."""
        for held in self.held:
            if held.migration == migration_id:
                held.users += 1
                return
        self.held.append(GateHeld(migration_id, reason, 1))

    @property
    def ok(self) -> bool:
        """True when no user failed and the run went to its end."""
        return self.failed == 0 and self.not_started == 0 and self.state == "completed"

    def counts(self) -> RunCounts:
        """The counts, as the run record keeps them."""
        return RunCounts(**{f.name: getattr(self, f.name) for f in fields(RunCounts)})

    def as_dict(self) -> dict[str, object]:
        """The summary as plain data (for JSON): run id, state and halt reason first,
        the gates that held users (``held``), then ``rehearsal`` (true: nothing changed)."""
        head = {"run_id": self.run_id, "state": self.state, "halt_reason": self.halt_reason}
        errors = {"errors": [asdict(e) for e in self.errors]}
        held = {"held": [asdict(h) for h in self.held]}
        return head | asdict(self.counts()) | errors | held | {"rehearsal": self.rehearsal}
