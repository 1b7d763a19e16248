"""What running one user produced: each step's result, the user's result, and how an
instance's stamp compares with the registry."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from byod.errors import ByodError
from byod.registry import Registry
from byod.targets.base import StampEntry

__all__ = [
    "RowsProgress",
    "StepResult",
    "UserResult",
    "check_stamp",
    "steps_from_json",
    "steps_to_json",
]


@dataclass(frozen=True)
class StepResult:
    """What happened to one step of a user's plan."""

    migration_id: str
    version: int
    direction: str
    status: str  # completed | failed | skipped | already-applied | recovered
    seconds: float = 0.0
    error: str | None = None
    #: a phased step's rows done by its backfills (None: the step has none)
    rows: int | None = None


@dataclass(frozen=True)
class RowsProgress:
    """A backfill batch done on one user's instance: the step's rows done so far, and
    the estimated total (counted with its schema change)."""

    user_id: int
    migration_id: str
    rows_done: int
    rows_total: int | None


@dataclass(frozen=True)
class UserResult:
    """The outcome of one user's run; ``error`` is set when it did not finish.
    ``from_version`` and ``to_version`` are None when they are not known (the user
    failed before anything could be read: the control plane out of reach)."""

    user_id: int
    clerk_id: str
    from_version: int | None
    to_version: int | None
    steps: tuple[StepResult, ...] = ()
    error: ByodError | None = field(default=None, compare=False)
    seconds: float = field(default=0.0, compare=False)
    #: the kind of the user's instance, where the control plane says (for metrics)
    target_kind: str | None = field(default=None, compare=False)
    #: a rehearsal's result: whatever it says, the instance was left unchanged
    rehearsal: bool = field(default=False, compare=False)
    #: the gate the user stopped before (its migration id), and who or what holds it
    held: tuple[str, str] | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        """True when every planned step is done."""
        return self.error is None

    @property
    def changed(self) -> bool:
        """True when at least one step was applied (or, applied by this same run before
        its runner was lost, found done and recorded: ``recovered``; or, in a rehearsal,
        run and rolled back: ``rehearsed``)."""
        return any(step.status in ("completed", "recovered", "rehearsed") for step in self.steps)

    @property
    def failed_migration(self) -> str | None:
        """The id of the step that failed, if one did."""
        return next((s.migration_id for s in self.steps if s.status == "failed"), None)


def check_stamp(registry: Registry, stamp: list[StampEntry]) -> list[str]:
    """Problems between an instance's stamp and the registry (empty when they agree)."""
    problems = []
    for position, entry in enumerate(stamp, start=1):
        migration = registry.get(entry.id)
        if migration is None:
            problems.append(
                f"{entry.id} (version {entry.version}) is applied on the instance but is not "
                "in the migrations folder"
            )
        elif not migration.checksum_matches(entry.checksum):
            problems.append(
                f"{entry.id} changed after it was applied (checksum {entry.checksum[:12]} "
                f"applied, {migration.checksum[:12]} in the file now)"
            )
        elif entry.version != position:
            problems.append(f"{entry.id} is applied out of order (stamp position {position})")
    return problems


def steps_to_json(steps: tuple[StepResult, ...]) -> str:
    """Step results as stored with a distributed task's end."""
    return json.dumps([asdict(step) for step in steps])


def steps_from_json(text: str | None) -> tuple[StepResult, ...]:
    """Step results as :func:`steps_to_json` stored them."""
    return tuple(StepResult(**step) for step in json.loads(text or "[]"))
