"""What the runner needs from an instance, whatever kind it is: one small protocol.

A target reads the instance's stamp (its own record of what is applied) and applies one
step in one instance transaction together with the stamp write, under the instance-side
lock. It translates driver errors into byod's errors at this boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import sqlalchemy as sa

from byod.registry import Step

__all__ = ["CONTROL_PLANE_TABLE", "StampEntry", "StepBody", "Target"]

#: The table whose one row names a byod control plane (written by ``byod init``); a
#: database that holds it with the control plane's id is never migrated as an instance.
CONTROL_PLANE_TABLE = "byod_control_plane"

#: The work of one step, run inside the instance transaction (``up`` or ``down``).
StepBody = Callable[[sa.Connection], None]


@dataclass(frozen=True)
class StampEntry:
    """One applied migration, as the instance records it."""

    id: str
    version: int
    checksum: str
    applied_at: datetime


class Target(Protocol):
    """An open connection to one user's instance."""

    def read_stamp(self) -> list[StampEntry]:
        """What the instance says is applied, oldest first."""
        ...

    def apply(self, step: Step, body: StepBody, deadline: float | None = None) -> bool:
        """Run ``body`` and record ``step`` in the stamp, in one locked transaction.

        ``deadline`` (a ``time.monotonic()`` value) bounds the work; past it the
        transaction is stopped and rolled back with ``InstanceTimeoutError``.

        Returns False, without running ``body``, when the stamp (re-read under the lock)
        shows the step already done. Raises ``BusyError`` when another runner holds the
        instance lock, ``MigrationFailedError`` when ``body`` raises (everything rolled
        back), ``UnreachableError`` when the connection drops.
        """
        ...

    def clear_dirty(self) -> list[str]:
        """Forget dirty markers (steps that failed halfway where DDL is not transactional)."""
        ...

    def close(self) -> None:
        """Close the connection."""
        ...
