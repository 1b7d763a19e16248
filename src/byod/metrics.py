"""Prometheus metrics of the work done in this process (``prometheus-client``).

Counted where the work happens, whichever process does it (a fleet run's threads, its
``--processes`` workers, a ``byod worker``'s Celery pool): users by outcome, steps by
migration and outcome, step durations, users in flight, retries, leases taken over from
a lost runner, backfill rows. Labels are the migration, the target kind, the direction
and the outcome, never a run or a user id. In several processes (a prefork pool,
``--processes``) prometheus-client's multiprocess mode adds them up: the variable
``PROMETHEUS_MULTIPROC_DIR`` names the folder each process writes to (see
:func:`multiprocess_registry`).
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import multiprocess as _multiprocess

from byod.errors import SettingsError

__all__ = [
    "BACKFILL_ROWS",
    "LEASE_TAKEOVERS",
    "RETRIES",
    "RUNS_STARTED",
    "STEPS",
    "STEP_SECONDS",
    "USERS",
    "USERS_IN_FLIGHT",
    "multiprocess_registry",
    "serve_metrics",
]

USERS = Counter(
    "byod_users",
    "Users worked on by a fleet run, by how each ended (succeeded, failed, busy, "
    "up_to_date, not_eligible).",
    ["target_kind", "outcome"],
)
STEPS = Counter(
    "byod_steps",
    "Migration steps run on users' instances, by outcome (completed, already-applied, "
    "failed, skipped).",
    ["migration", "direction", "target_kind", "outcome"],
)
STEP_SECONDS = Histogram(
    "byod_step_duration_seconds",
    "How long one step took on an instance (its transaction, or all its phases).",
    ["migration", "target_kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
USERS_IN_FLIGHT = Gauge(
    "byod_users_in_flight",
    "Users being worked on right now.",
    multiprocess_mode="livesum",
)
RETRIES = Counter(
    "byod_retries",
    "Retries of a user after a transient failure (busy, unreachable, timeout).",
    ["target_kind"],
)
LEASE_TAKEOVERS = Counter(
    "byod_lease_takeovers",
    "Users taken over from a runner that was lost (its rows left running, settled now).",
)
BACKFILL_ROWS = Counter(
    "byod_backfill_rows",
    "Rows done by backfill batches.",
    ["migration", "target_kind"],
)


RUNS_STARTED = Counter(
    "byod_runs_started",
    "Runs this process started (byod serve: runs started over HTTP), by kind "
    "(fleet, user, distributed).",
    ["kind"],
)


def multiprocess_registry() -> CollectorRegistry | None:
    """A registry that adds up the metrics of every process writing to
    ``PROMETHEUS_MULTIPROC_DIR`` (None when that variable is not set: one process, the
    default registry)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def serve_metrics(host: str, port: int) -> None:
    """Serve ``/metrics`` on ``host:port`` from a thread of this process (``byod worker
    --metrics-port``): every process writing to ``PROMETHEUS_MULTIPROC_DIR``, added up.
    :class:`SettingsError` when the address cannot be bound."""
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host, registry=multiprocess_registry() or REGISTRY)
    except OSError as exc:
        raise SettingsError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
        ) from exc
