"""What the runner needs from an instance, whatever kind it is: one small protocol.

A target reads the instance's stamp (its own record of what is applied) and applies one
step in one instance transaction together with the stamp write, under the instance-side
lock. It translates driver errors into byod's errors at this boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

import sqlalchemy as sa

from byod.errors import DriftError, SettingsError
from byod.registry import Backfill, FunctionCalls, Migration, Step

if TYPE_CHECKING:
    from byod.targets.backfill import Batch, Progress

__all__ = [
    "CONTROL_PLANE_TABLE",
    "BatchBody",
    "Phase",
    "Session",
    "StampEntry",
    "StepBody",
    "Target",
    "check_position",
    "control_plane_refusal",
    "started",
]

#: The table whose one row names a byod control plane (written by ``byod init``); a
#: database that holds it with the control plane's id is never migrated as an instance.
CONTROL_PLANE_TABLE = "byod_control_plane"

#: What a step's work runs on: a SQL instance's connection inside the step's transaction,
#: or a Convex deployment's functions.
Session = sa.Connection | FunctionCalls
#: The work of one step, run inside the instance transaction (``up`` or ``down``).
StepBody = Callable[[Session], None]
#: The work of one backfill batch: the connection, and the batch's rows.
BatchBody = Callable[[sa.Connection, Sequence[Any]], None]
#: Which part of a step one transaction does: the whole step with its stamp; a phased
#: step's schema change (its backfills' progress starts, no stamp yet); or its finalize
#: (the progress ends, the stamp is written).
Phase = Literal["whole", "schema", "finalize"]


@dataclass(frozen=True)
class StampEntry:
    """One applied migration, as the instance records it."""

    id: str
    version: int
    checksum: str
    applied_at: datetime


class Target(Protocol):
    """An open connection to one user's instance."""

    #: the instance's kind: ``sqlite``, ``postgresql``, ``mysql``, ``mariadb``, ``convex``
    kind: str

    def holds_control_plane(self, control_plane_id: str) -> bool:
        """Whether this instance is the byod control plane whose id is given."""
        ...

    def defer_control_plane_check(self, control_plane_id: str) -> bool:
        """Ask whether this instance is the control plane whose id is given later, in
        the round trip of :meth:`begin` or before whatever else is asked of it first
        (which then raises :func:`control_plane_refusal`, nothing touched). False where
        the target cannot: then ask :meth:`holds_control_plane` now."""
        ...

    def prepare(self, first: Migration | None = None) -> None:
        """Make the instance ready for this run's steps, before the first of them,
        ``first`` (a Convex deployment: the app's code that step runs on, deployed under
        the deployment's lock; SQL: nothing). Raises ``DeployError`` when it cannot be
        made ready (no step may run then), ``BusyError`` when another runner holds it."""
        ...

    def finish(self, at: Migration | None, head: bool) -> None:
        """After a plan's last step, at the version of migration ``at`` (None: version 0;
        ``head``: the registry's head): leave the instance running the app code of that
        version (a Convex app kept in git; elsewhere nothing). ``DeployError`` when that
        deploy fails (the steps stand)."""
        ...

    def read_stamp(self) -> list[StampEntry]:
        """What the instance says is applied, oldest first."""
        ...

    def begin(self, deadline: float | None = None) -> list[StampEntry]:
        """:meth:`read_stamp` for a run that may apply steps next: where the instance
        allows, read in the transaction the first step will use, its lock already
        taken (bounded by ``deadline``), so the step neither locks nor reads the stamp
        again. That transaction is given up (rolled back) by any other write and by
        :meth:`close`. Raises ``BusyError`` when another runner holds the lock."""
        ...

    def rehearse(self, deadline: float | None = None) -> list[StampEntry]:
        """:meth:`begin` for a rehearsal: the instance's lock and one transaction held
        until :meth:`close`, which rolls it back; every step and batch applied meanwhile
        runs inside it (a savepoint each), so nothing they do is ever committed. Raises
        ``RehearsalError`` where that cannot be done (DDL that commits on its own)."""
        ...

    def apply(
        self, step: Step, body: StepBody, deadline: float | None = None, phase: Phase = "whole"
    ) -> bool:
        """Run ``body`` and record ``step`` in the stamp, in one locked transaction (for a
        phased step's ``schema`` phase: start its progress instead of the stamp).

        ``deadline`` (a ``time.monotonic()`` value) bounds the work; past it the
        transaction is stopped and rolled back with ``InstanceTimeoutError``.

        Returns False, without running ``body``, when the stamp (re-read under the lock)
        shows the step already done. Raises ``BusyError`` when another runner holds the
        instance lock, ``MigrationFailedError`` when ``body`` raises (everything rolled
        back), ``UnreachableError`` when the connection drops.
        """
        ...

    def read_progress(self, step: Step) -> Progress | None:
        """Where a phased step in progress stands (None: its schema change is not done)."""
        ...

    def in_progress(self) -> list[str]:
        """The ids of the phased steps in progress on the instance (schema change done,
        stamp not yet written)."""
        ...

    def apply_batch(
        self,
        step: Step,
        at: Progress,
        work: Backfill,
        batch_size: int,
        body: BatchBody,
        deadline: float | None = None,
    ) -> Batch:
        """Apply the next batch of ``work`` after where the step is ``at`` and move its
        cursor, in one transaction (``MigrationFailedError`` names the batch's keys;
        ``DriftError`` when the cursor is not where ``at`` says)."""
        ...

    def clear_dirty(self) -> list[str]:
        """Forget dirty markers (steps that failed halfway where DDL is not transactional)."""
        ...

    def close(self) -> None:
        """Close the connection."""
        ...

    def __enter__(self) -> Target:
        """The target itself; closed on leaving the ``with`` block."""
        ...

    def __exit__(self, *exc_info: object) -> None:
        """Close it."""
        ...


def control_plane_refusal(where: str) -> SettingsError:
    """The error for an instance that is byod's own control plane (nothing touched)."""
    return SettingsError(
        f"the instance {where} is byod's own control plane: refused, nothing was touched",
        hint="Connect the user's own database, never BYOD_DATABASE_URL's.",
    )


def check_position(step: Step, stamp: list[StampEntry]) -> bool:
    """Whether ``step`` is still to do on an instance whose stamp is ``stamp`` (False:
    done already); :class:`DriftError` when the instance is not at the version the step
    starts from (it changed under this run)."""
    migration = step.migration
    applied = {entry.id for entry in stamp}
    current = stamp[-1].version if stamp else 0
    if step.direction == "up":
        if migration.id in applied:
            return False
        expected = migration.version - 1
    else:
        if migration.id not in applied:
            return False
        expected = migration.version
    if current != expected:
        raise DriftError(
            f"instance is at version {current} but {migration.id} ({step.direction}) "
            f"needs it at version {expected}: it changed under this run"
        )
    return True


#: how an undo in progress (a rollback's reverse pages) is named on the instance
UNDO_SUFFIX = ":down"


def progress_key(step: Step) -> str:
    """The name a phased step's progress has on the instance: the migration's id, or for
    a rollback's reverse pages the id and :data:`UNDO_SUFFIX`."""
    migration_id = step.migration.id
    return migration_id if step.direction == "up" else migration_id + UNDO_SUFFIX


def started(step: Step, in_progress: list[str]) -> bool:
    """Whether the phased step's schema change is done already, given the steps in
    progress on the instance; ``DriftError`` when another step is in progress there (a
    migration renamed or replaced halfway, or a rollback left halfway)."""
    key = progress_key(step)
    others = [i for i in in_progress if i != key]
    undone = [i.removesuffix(UNDO_SUFFIX) for i in others if i.endswith(UNDO_SUFFIX)]
    if undone:
        raise DriftError(
            f"the rollback of {', '.join(undone)} is in progress on this instance (part of "
            f"its data undone), so {step.migration.id} {step.direction} cannot run: `byod "
            "rollback` finishes it"
        )
    if others:
        raise DriftError(
            f"{', '.join(others)} is in progress on this instance (its schema change done, "
            f"its backfills not), so {step.migration.id} cannot start: restore that "
            "migration file and migrate to finish it"
        )
    return key in in_progress
