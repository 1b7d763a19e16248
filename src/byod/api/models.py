"""The HTTP API's request and response bodies (they make the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from byod.controlplane import FailureRow, FleetStatus, LedgerRow, RunRecord

__all__ = [
    "FleetRunRequest",
    "FleetStatusOut",
    "HistoryPage",
    "InstanceOut",
    "PendingOut",
    "PendingStep",
    "Problem",
    "RunOut",
    "RunStarted",
]


#: The largest number a control plane's INTEGER column holds on every database.
_MAX_INT = 2**31 - 1


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str
    title: str
    status: int
    detail: str


class InstanceOut(BaseModel):
    """The caller's database: where it stands."""

    user_id: int
    clerk_id: str
    connection_status: str
    schema_version: int
    head_version: int
    pending: int
    last_error: str | None


class HistoryPage(BaseModel):
    """A page of history, newest first."""

    items: list[LedgerRow]
    limit: int
    offset: int


class PendingStep(BaseModel):
    """A migration the instance still needs."""

    id: str
    version: int
    name: str
    description: str


class PendingOut(BaseModel):
    """What is pending for the caller."""

    count: int
    migrations: list[PendingStep]


class RunStarted(BaseModel):
    """A run was started."""

    run_id: str


class RunOut(BaseModel):
    """A fleet run and its progress."""

    id: str
    kind: str
    state: str
    started_by: str
    started_at: datetime
    ended_at: datetime | None
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
        return cls(
            id=run.id,
            kind=run.kind,
            state=run.shown_state,
            started_by=run.started_by,
            started_at=run.started_at,
            ended_at=run.ended_at,
            target_version=run.target_version,
            undoes=run.undoes,
            planned=run.planned,
            succeeded=c.succeeded,
            failed=c.failed,
            busy=c.busy,
            up_to_date=c.up_to_date,
            not_started=c.not_started,
            not_eligible=c.not_eligible,
            done=c.done,
            remaining=run.remaining,
            halt_reason=run.halt_reason,
            distributed=run.distributed,
            in_flight=run.in_flight,
            rows_done=rows_done,
            rows_total=rows_total,
        )


class FleetStatusOut(BaseModel):
    """The fleet at a glance."""

    head: int
    users: int
    by_version: dict[str, int]
    by_connection: dict[str, int]
    outdated: int
    recent_failures: list[FailureRow]

    @classmethod
    def of(cls, status: FleetStatus) -> FleetStatusOut:
        return cls(
            head=status.head,
            users=status.users,
            by_version={str(k): v for k, v in status.by_version.items()},
            by_connection=status.by_connection,
            outdated=status.outdated,
            recent_failures=status.recent_failures,
        )


class FleetRunRequest(BaseModel):
    """Options of a fleet run started over HTTP. An unknown or misspelt field, a value of
    the wrong type (``true`` for a number) or ``per_host`` without ``distributed`` is a
    422: a safety limit is never silently dropped."""

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
    def _not_a_boolean(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("a number, not true or false")
        return value

    @model_validator(mode="after")
    def _per_host_is_distributed(self) -> FleetRunRequest:
        if self.per_host is not None and not self.distributed:
            raise ValueError("per_host goes with distributed: true")
        if self.rehearse and self.distributed:
            raise ValueError("rehearse runs on the server, not on workers: not with distributed")
        return self
