"""Fleet runs: every outdated user (or a selection), migrated by a bounded pool in this
process, recorded as one run.

* :mod:`~byod.fleet.selection` which users, sized first, then streamed;
* :mod:`~byod.fleet.outcome` one user: retries, a control plane out of reach, the outcome;
* :mod:`~byod.fleet.halt` when a run halts (shared with distributed runs);
* :mod:`~byod.fleet.pools` worker processes for CPU-bound fleets;
* :mod:`~byod.fleet.run` the run itself; :mod:`~byod.fleet.summary` its events and summary.
"""

from byod.fleet.outcome import FleetFailure, Settled, attempt, settle
from byod.fleet.run import migrate_fleet, rollback_run
from byod.fleet.selection import SelectionSize, size_selection
from byod.fleet.summary import (
    FleetEvent,
    FleetStarted,
    FleetSummary,
    RowsProgress,
    UserFinished,
)

__all__ = [
    "FleetEvent",
    "FleetFailure",
    "FleetStarted",
    "FleetSummary",
    "RowsProgress",
    "SelectionSize",
    "Settled",
    "UserFinished",
    "attempt",
    "migrate_fleet",
    "rollback_run",
    "settle",
    "size_selection",
]
