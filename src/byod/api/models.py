"""The HTTP API's request and response bodies (they make the OpenAPI document)."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from byod.api.problems import PROBLEM_TYPES
from byod.clock import as_utc
from byod.controlplane import FleetStatus, LedgerRow, RunRecord
from byod.controlplane.schema import ConnectionStatus, Direction, LedgerStatus, RunKind, RunState

__all__ = [
    "FleetRunRequest",
    "FleetStatusOut",
    "HistoryEntry",
    "HistoryPage",
    "InstanceOut",
    "PendingOut",
    "PendingStep",
    "Problem",
    "RecentFailure",
    "RunOut",
    "RunStarted",
]


#: The largest number a control plane's INTEGER column holds on every database.
_MAX_INT = 2**31 - 1


#: A moment, always answered in UTC with its offset (``2026-11-28T23:10:46.485731Z``):
#: the control plane's naive UTC made aware, which pydantic writes with ``Z``.
Timestamp = Annotated[datetime, AfterValidator(as_utc)]


class _Answer(BaseModel):
    """A response body: every field is always present (``null`` where it says so), so the
    document marks them all required and a generated client needs no optional checks."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


class Problem(_Answer):
    """An RFC 9457 problem document; ``type`` says which error it is."""

    type: str = Field(json_schema_extra={"enum": list(PROBLEM_TYPES)})
    title: str
    status: int = Field(ge=400, le=599)
    detail: str


class InstanceOut(_Answer):
    """The caller's database: where it stands."""

    user_id: int
    clerk_id: str
    connection_status: ConnectionStatus
    schema_version: int
    head_version: int
    pending: int
    last_error: str | None


class HistoryEntry(_Answer):
    """One attempt of one step on one user's database (a ledger row)."""

    id: int
    user_id: int
    migration_id: str
    version: int
    direction: Direction
    status: LedgerStatus
    error: str | None
    attempts: int
    #: the run it was part of (``null``: applied on its own)
    run_id: str | None
    started_at: Timestamp | None
    completed_at: Timestamp | None
    created_at: Timestamp
    #: a phased step's rows done by its backfills, and their estimated total
    rows_done: int | None
    rows_total: int | None
    #: how its backfills' page sizes went when a page hit the instance's transaction
    #: limit (Convex; ``null``: every page fit its declared size)
    page_sizes: str | None = None

    @classmethod
    def of(cls, row: LedgerRow) -> HistoryEntry:
        return cls.model_validate(row, from_attributes=True)


class HistoryPage(_Answer):
    """A page of history, newest first."""

    items: list[HistoryEntry]
    limit: int
    offset: int

    @classmethod
    def of(cls, rows: list[LedgerRow], limit: int, offset: int) -> HistoryPage:
        return cls(items=[HistoryEntry.of(row) for row in rows], limit=limit, offset=offset)


class PendingStep(_Answer):
    """A migration the instance still needs."""

    id: str
    version: int
    name: str
    description: str


class PendingOut(_Answer):
    """What is pending for the caller (``connected`` false, and nothing pending, while
    the caller has no database connected: the original plan's ``getPendingMigrations``
    answers 0 then)."""

    count: int
    migrations: list[PendingStep]
    connected: bool


class RunStarted(_Answer):
    """A run was started."""

    run_id: str


class RunOut(_Answer):
    """A fleet run and its progress."""

    id: str
    kind: RunKind
    state: RunState
    started_by: str
    started_at: Timestamp
    ended_at: Timestamp | None
    target_version: int | None
    undoes: str | None
    planned: int | None
    succeeded: int
    failed: int
    busy: int
    up_to_date: int
    not_started: int
    not_eligible: int
    done: int
    remaining: int | None
    halt_reason: str | None
    #: run on task-queue workers; ``in_flight``: its users handed out, not finished yet
    distributed: StrictBool = False
    in_flight: int = 0
    #: rows its users' backfills have done so far, and the estimated total of those users
    rows_done: int = 0
    rows_total: int = 0

    @classmethod
    def of(cls, run: RunRecord, rows_done: int = 0, rows_total: int = 0) -> RunOut:
        c = run.counts
        fields: dict[str, Any] = {
            "id": run.id,
            "kind": run.kind,
            "state": run.shown_state,
            "started_by": run.started_by,
            "started_at": run.started_at,
            "ended_at": run.ended_at,
            "target_version": run.target_version,
            "undoes": run.undoes,
            "planned": run.planned,
            "succeeded": c.succeeded,
            "failed": c.failed,
            "busy": c.busy,
            "up_to_date": c.up_to_date,
            "not_started": c.not_started,
            "not_eligible": c.not_eligible,
            "done": c.done,
            "remaining": run.remaining,
            "halt_reason": run.halt_reason,
            "distributed": run.distributed,
            "in_flight": run.in_flight,
            "rows_done": rows_done,
            "rows_total": rows_total,
        }
        return cls.model_validate(fields)


class RecentFailure(_Answer):
    """A recent failed attempt, and whom it hit."""

    user_id: int
    clerk_id: str
    migration_id: str
    direction: Direction
    error: str | None
    at: Timestamp | None


class GateOut(_Answer):
    """A gated migration (a contract step) and its gate: ``open`` or ``closed`` (never
    opened, or closed again), who changed it and when, the users left behind then (byod
    ids), and how many eligible users are not through the steps before it (``waiting``)
    or past it (``through``)."""

    migration_id: str
    version: int
    state: Literal["open", "closed"]
    changed_by: str | None
    changed_at: Timestamp | None
    excluded: list[int]
    waiting: int
    through: int


class FleetStatusOut(_Answer):
    """The fleet at a glance (``by_version``: users per schema version, the version as a
    string key; ``by_connection``: users per connection status, ``not configured`` for
    users registered without a database yet)."""

    head: int
    users: int
    by_version: dict[str, int]
    by_connection: dict[ConnectionStatus | Literal["not configured"], int]
    outdated: int
    recent_failures: list[RecentFailure]
    #: the gated migrations of the folder and their gates, oldest first
    gates: list[GateOut] = []

    @classmethod
    def of(cls, status: FleetStatus) -> FleetStatusOut:
        return cls.model_validate(
            {
                "head": status.head,
                "users": status.users,
                "by_version": {str(k): v for k, v in status.by_version.items()},
                "by_connection": status.by_connection,
                "outdated": status.outdated,
                "recent_failures": [
                    RecentFailure.model_validate(row, from_attributes=True)
                    for row in status.recent_failures
                ],
                "gates": [
                    GateOut.model_validate(
                        {**dataclasses.asdict(gate), "excluded": list(gate.excluded)}
                    )
                    for gate in status.gates
                ],
            }
        )


class FleetRunRequest(BaseModel):
    """Options of a fleet run started over HTTP. An unknown or misspelt field, a value of
    the wrong type (``true`` or ``"2"`` for a number) or ``per_host`` without
    ``distributed`` is a 422: a safety limit is never silently dropped."""

    model_config = ConfigDict(
        extra="forbid",
        # the document says it too: a ``per_host`` number needs ``distributed: true``, and
        # ``rehearse: true`` refuses it
        json_schema_extra={
            "allOf": [
                {
                    "if": {
                        "properties": {"per_host": {"type": "integer"}},
                        "required": ["per_host"],
                    },
                    "then": {
                        "properties": {"distributed": {"const": True}},
                        "required": ["distributed"],
                    },
                },
                {
                    "if": {"properties": {"rehearse": {"const": True}}, "required": ["rehearse"]},
                    "then": {"properties": {"distributed": {"const": False}}},
                },
            ]
        },
    )

    #: default: the CLI's (users at once; a distributed run's cap on tasks in flight)
    concurrency: int | None = Field(default=None, ge=1, le=256)
    retries: int = Field(default=2, ge=0, le=10)
    timeout: float | None = Field(default=None, gt=0, le=86400)
    canary: int = Field(default=0, ge=0, le=_MAX_INT)
    max_failure_ratio: float | None = Field(default=None, ge=0, le=1)
    only_version: int | None = Field(default=None, ge=0, le=_MAX_INT)
    limit: int | None = Field(default=None, ge=1, le=_MAX_INT)
    #: run on task-queue workers (needs a broker and a PostgreSQL control plane);
    #: ``concurrency`` is then the run's cap on tasks in flight
    distributed: StrictBool = False
    #: with ``distributed``: at most this many users at once per database server
    per_host: int | None = Field(default=None, ge=1, le=1024)
    #: rehearse instead of migrating: every user's steps in one instance transaction,
    #: rolled back; a run of kind ``rehearse`` (SQLite and PostgreSQL users only; not
    #: with ``distributed``)
    rehearse: StrictBool = False

    @field_validator(
        "concurrency",
        "retries",
        "timeout",
        "canary",
        "max_failure_ratio",
        "only_version",
        "limit",
        "per_host",
        mode="before",
    )
    @classmethod
    def _a_json_number(cls, value: object) -> object:
        # what JSON Schema calls a number (``2.0`` is an integer, as the document says),
        # never a string or a boolean
        if isinstance(value, bool | str):
            raise ValueError("a number, not a string or true/false")
        return value

    @model_validator(mode="after")
    def _per_host_is_distributed(self) -> FleetRunRequest:
        if self.per_host is not None and not self.distributed:
            raise ValueError("per_host goes with distributed: true")
        if self.rehearse and self.distributed:
            raise ValueError("rehearse runs on the server, not on workers: not with distributed")
        return self
