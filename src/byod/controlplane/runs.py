"""Fleet runs: one row per run (who, options, state, counts), and what a run moved.

A run's state is ``running`` until it ends ``completed``, ``halted`` (a canary or the
failure ratio stopped it) or ``interrupted`` (Ctrl-C). A run whose process died stays
``running`` in the table; readers see it as ``interrupted`` once it has not reported for
longer than :data:`STALE_AFTER`.
"""

from __future__ import annotations

import getpass
import json
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from byod.clock import utcnow
from byod.controlplane._tx import reading, single
from byod.controlplane.schema import ledger, runs, users
from byod.errors import InputError

__all__ = ["STALE_AFTER", "MovedUser", "RunCounts", "RunRecord", "RunStore"]

#: A running run that has not written its progress for this long is taken as lost.
STALE_AFTER = timedelta(seconds=60)


@dataclass(frozen=True)
class RunCounts:
    """The counts a run reports: ``total`` is every user the run took (succeeded, failed,
    busy, up to date or not started); ``not_eligible`` users are outside it."""

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


@dataclass(frozen=True)
class RunRecord:
    """One fleet run as recorded."""

    id: str
    kind: str
    started_by: str
    options: dict[str, object]
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
    def distributed(self) -> bool:
        """True for a run whose users are migrated by task-queue workers."""
        return bool(self.options.get("distributed"))

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


_RECORD_COLUMNS = [
    c for c in runs.columns if c.name not in ("cursor_version", "cursor_user", "exhausted")
]


def _record(row: sa.Row[tuple[object, ...]]) -> RunRecord:
    data = row._asdict()
    counts = {name: int(data.pop(name)) for name in RunCounts.__dataclass_fields__}
    counts["up_to_date"] += int(data.pop("skipped"))  # a run recorded by an older byod
    data["options"] = json.loads(str(data["options"]))
    return RunRecord(counts=RunCounts(**counts), **data)


def _local_user() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


class RunStore:
    """Writes and reads ``byod_runs``."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def start(
        self,
        kind: str,
        options: Mapping[str, object],
        *,
        target_version: int | None = None,
        undoes: str | None = None,
        started_by: str | None = None,
    ) -> str:
        """Record a new run as ``running``; returns its id. ``started_by``: who asked
        for it (an HTTP caller's token subject); default this process's OS user@host."""
        now = utcnow()
        run_id = f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        with single(self.engine, "record the run") as conn:
            conn.execute(
                runs.insert().values(
                    id=run_id,
                    kind=kind,
                    started_by=(started_by or _local_user())[:255],
                    options=json.dumps(dict(options), sort_keys=True),
                    state="running",
                    target_version=target_version,
                    undoes=undoes,
                    started_at=now,
                    updated_at=now,
                )
            )
        return run_id

    def progress(self, run_id: str, counts: RunCounts, *, planned: int | None = None) -> None:
        """Write the counts so far (and that the run is alive); ``planned``: its size."""
        if planned is None:
            self._write(run_id, counts)
        else:
            self._write(run_id, counts, planned=planned)

    def finish(
        self, run_id: str, counts: RunCounts, state: str, halt_reason: str | None = None
    ) -> None:
        """Record how the run ended."""
        self._write(run_id, counts, state=state, halt_reason=halt_reason, ended_at=utcnow())

    def _write(self, run_id: str, counts: RunCounts, **values: object) -> None:
        with single(self.engine, "record the run's progress") as conn:
            conn.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(updated_at=utcnow(), **counts.__dict__, **values)
            )

    def get(self, run_id: str) -> RunRecord:
        """One run; :class:`InputError` when there is none with that id."""
        with reading(self.engine, "read the run") as conn:
            row = conn.execute(sa.select(*_RECORD_COLUMNS).where(runs.c.id == run_id)).first()
        if row is None:
            raise InputError(f"no fleet run {run_id!r} (see `byod runs`)")
        return _record(row)

    def recent(self, limit: int = 20) -> list[RunRecord]:
        """The newest runs first."""
        query = (
            sa.select(*_RECORD_COLUMNS)
            .order_by(runs.c.started_at.desc(), runs.c.id.desc())
            .limit(limit)
        )
        with reading(self.engine, "list runs") as conn:
            return [_record(row) for row in conn.execute(query)]

    def failures(self, run_id: str, limit: int = 100) -> list[tuple[int, str, str, str | None]]:
        """(user id, clerk id, migration, error) of the run's failed steps."""
        query = (
            sa.select(users.c.id, users.c.clerk_id, ledger.c.migration_id, ledger.c.error)
            .join(users, users.c.id == ledger.c.user_id)
            .where(ledger.c.run_id == run_id, ledger.c.status == "failed")
            .order_by(ledger.c.id)
            .limit(limit)
        )
        with reading(self.engine, "read the run's failures") as conn:
            return [(int(r[0]), str(r[1]), str(r[2]), r[3]) for r in conn.execute(query)]

    def moved_users(self, run_id: str) -> list[MovedUser]:
        """Users the run brought up at least one step, with the version each had before."""
        query = (
            sa.select(users.c.id, users.c.clerk_id, sa.func.min(ledger.c.version))
            .join(users, users.c.id == ledger.c.user_id)
            .where(
                ledger.c.run_id == run_id,
                ledger.c.direction == "up",
                ledger.c.status == "completed",
            )
            .group_by(users.c.id, users.c.clerk_id)
            .order_by(users.c.id)
        )
        with reading(self.engine, "read what the run moved") as conn:
            return [MovedUser(int(r[0]), str(r[1]), int(r[2]) - 1) for r in conn.execute(query)]
