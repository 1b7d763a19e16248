"""What a fleet run is asked to do, and what it counts.

A run's specification (:class:`RunSpec`: its options, its selection, its target) is a
frozen dataclass everywhere: it is serialised to the run's row and parsed back here, and
nowhere else. :data:`OUTCOMES` and :class:`RunCounts` are the one list of the counters a
run reports.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from byod.errors import InputError

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_IN_FLIGHT",
    "ELIGIBLE_STATUSES",
    "OUTCOMES",
    "FleetOptions",
    "RunCounts",
    "RunSpec",
    "Selection",
    "default_concurrency",
]

#: Connection statuses a fleet run takes (an instance that was unreachable is retried).
ELIGIBLE_STATUSES = ("connected", "error")
#: Instances are mostly waited on (network, disk), so a few per core.
DEFAULT_CONCURRENCY = min(32, 4 * (os.cpu_count() or 2))
#: A distributed run's cap on tasks in flight: enough queued that no worker waits.
DEFAULT_IN_FLIGHT = 256


def default_concurrency(distributed: bool) -> int:
    """``--concurrency`` when none is given: users at once in this process, or a
    distributed run's cap on tasks in flight."""
    return DEFAULT_IN_FLIGHT if distributed else DEFAULT_CONCURRENCY


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
    #: rows per backfill batch (None: each backfill's own), and seconds between batches
    batch_size: int | None = None
    batch_pause: float = 0.0

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
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError("--batch-size must be at least 1")
        if self.batch_pause < 0:
            raise InputError("--batch-pause cannot be negative")

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
class RunSpec:
    """Everything a fleet run was asked to do, as its row keeps it.

    ``undoes``: the run a rollback run undoes. ``distributed`` runs also keep the
    statuses they select, their ``--users`` resolved (``user_ids``), their cap per
    database server and the fingerprint of their migrations (a worker whose folder
    differs refuses their users).
    """

    options: FleetOptions = field(default_factory=FleetOptions)
    selection: Selection = field(default_factory=Selection)
    to_version: int | None = None
    undoes: str | None = None
    distributed: bool = False
    per_host: int | None = None
    statuses: tuple[str, ...] = ELIGIBLE_STATUSES
    user_ids: tuple[int, ...] | None = None
    migrations: str | None = None

    def flat(self) -> dict[str, Any]:
        """One flat mapping of every setting (what is stored, and what is shown)."""
        data = {**asdict(self.options), **asdict(self.selection)}
        data |= {f.name: getattr(self, f.name) for f in _OWN_FIELDS}
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in data.items()
        }

    def to_json(self) -> str:
        """The specification as stored in ``byod_runs.options``."""
        return json.dumps(self.flat(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        """Parse a stored specification (also one written by an earlier byod, whose keys
        were the same; unknown keys are ignored, missing ones take their defaults)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            data = {}
        return cls(
            options=FleetOptions(**_known(FleetOptions, data)),
            selection=Selection(
                users=_ids(data.get("users")),
                only_version=data.get("only_version"),
                limit=data.get("limit"),
            ),
            to_version=data.get("to_version"),
            undoes=data.get("undoes"),
            distributed=bool(data.get("distributed")),
            per_host=data.get("per_host"),
            statuses=tuple(data.get("statuses") or ELIGIBLE_STATUSES),
            user_ids=_ids(data.get("user_ids")),
            migrations=data.get("migrations"),
        )


_OWN_FIELDS = [f for f in fields(RunSpec) if f.name not in ("options", "selection")]


def _known(kind: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(kind)}
    return {key: value for key, value in data.items() if key in names and value is not None}


def _ids(value: object) -> tuple[int, ...] | None:
    """Byod ids as stored; an earlier byod stored ``--users`` as text references, which
    are kept only where they are plain ids (a clerk id is never taken for one)."""
    if not isinstance(value, list):
        return None
    if all(isinstance(item, int) for item in value):
        return tuple(value)
    if all(isinstance(item, str) and item.isascii() and item.isdigit() for item in value):
        return tuple(int(item) for item in value)
    return None


@dataclass
class RunCounts:
    """The counts a run reports, the one list of them: ``total`` is every user the run
    took (succeeded, failed, busy, up to date or not started); ``not_eligible`` users are
    outside it. A fleet run's summary tallies them as it goes."""

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    busy: int = 0
    up_to_date: int = 0
    not_started: int = 0
    not_eligible: int = 0

    @property
    def done(self) -> int:
        """Users the run is finished with (``not_started`` ones excepted)."""
        return self.succeeded + self.failed + self.busy + self.up_to_date


#: How a user of a fleet run can end: ``busy`` (another runner holds its lease),
#: ``up_to_date`` (nothing to do by its turn), ``not_started`` (the run halted before
#: it), ``not_eligible`` (disconnected or removed meanwhile: never touched, not in
#: ``total``). Each is a counter of :class:`RunCounts`.
OUTCOMES = tuple(f.name for f in fields(RunCounts) if f.name != "total")
