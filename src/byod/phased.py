"""A phased step: its schema change, then each backfill batch by batch, then its finalize;
or, rolled back (Convex backfills with ``down_page``), each undo page batch by batch, then
its ``down`` (in the finalize's place: the stamp goes with it).

Each is its own instance transaction, bounded on its own by the run's timeout (so a
backfill of any size never times out as a whole). A step found in progress (its schema
change done, the stamp not written yet) resumes at its recorded cursor: never from the
start, never refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from byod.errors import DriftError, MigrationFailedError, StoppedError
from byod.logs import fields
from byod.registry import Step
from byod.spec import FleetOptions
from byod.targets import Target
from byod.targets.backfill import Progress
from byod.targets.base import BatchBody, StepBody

__all__ = ["Batching", "PhaseBodies", "run_phased"]

log = logging.getLogger("byod.runner")


@dataclass(frozen=True)
class Batching:
    """How backfills go: ``size`` overrides each backfill's batch size; ``pause``
    seconds between batches on one instance (a throttle for the user's own app)."""

    size: int | None = None
    pause: float = 0.0
    #: set when the run is stopped (Ctrl-C): a step stops after its current batch
    stop: threading.Event | None = field(default=None, compare=False)

    @classmethod
    def of(cls, options: FleetOptions, stop: threading.Event | None = None) -> Batching:
        """A run's batching, from its options (``--batch-size``, ``--batch-pause``)."""
        return cls(options.batch_size, options.batch_pause, stop)


@dataclass(frozen=True)
class PhaseBodies:
    """The work of each phase, run inside its transaction."""

    schema: StepBody
    batch: Callable[[int], BatchBody]
    finalize: StepBody


def run_phased(
    target: Target,
    step: Step,
    bodies: PhaseBodies,
    *,
    timeout: float | None,
    batching: Batching,
    user_id: int,
    on_rows: Callable[[int, int | None], None] = lambda rows, total: None,
    log_fields: Mapping[str, object] | None = None,
) -> int | None:
    """Bring a phased step to its end (resuming it if it is in progress); returns the
    rows its backfills did in all, or None when the instance's stamp shows it done
    already. ``on_rows`` hears the rows done (when the step starts or resumes, and after
    each batch), and the estimated total. ``log_fields``: the event fields of the step's
    log records (``--log-format json``: run, user, migration, direction)."""
    migration = step.migration
    extra = dict(log_fields or fields(user_id=user_id, migration=migration.id))
    progress = target.read_progress(step)
    if progress is None:
        if not target.apply(step, bodies.schema, _deadline(timeout), phase="schema"):
            return None
        progress = target.read_progress(step)  # with the rows counted for the estimate
    else:
        if (
            progress.checksum
            and migration.checksum
            and not migration.checksum_matches(progress.checksum)
        ):
            raise DriftError(
                f"{migration.id} changed since its schema change ran (the step is in "
                "progress): restore the file as it was, let `byod migrate` finish the step, "
                "then add a new migration"
            )
        log.info(
            "user %s: %s resumes at backfill %d",
            user_id,
            migration.id,
            progress.backfill,
            extra=extra,
        )
    if progress is None:  # the schema phase writes it: its loss shows at the first batch
        progress = Progress(0, None, 0)
    on_rows(progress.rows_done, progress.rows_total)
    backfills = migration.backfills_for(step.direction)
    for index in range(progress.backfill, len(backfills)):
        work = backfills[index]
        size = batching.size or work.batch_size
        body = bodies.batch(index)
        while True:
            batch = target.apply_batch(step, progress, work, size, body, _deadline(timeout))
            progress = batch.progress
            on_rows(progress.rows_done, progress.rows_total)
            if batch.finished:
                break
            if batching.stop is not None and batching.stop.is_set():
                raise StoppedError(
                    f"{migration.id}: the run was stopped with {progress.rows_done} of the "
                    "step's rows done; the step resumes at its cursor on the next run"
                )
            if batching.pause:
                time.sleep(batching.pause)
        log.info("user %s: %s backfill of %s done", user_id, migration.id, work.table, extra=extra)
    try:
        target.apply(step, bodies.finalize, _deadline(timeout), phase="finalize")
    except MigrationFailedError as exc:
        ending = "finalize" if step.direction == "up" else "down"
        raise MigrationFailedError(
            f"{migration.id}: its {ending} failed (its backfills are done and kept; the next "
            f"run runs the {ending} alone): {exc.message}"
        ) from exc
    log.info(
        "user %s: %s finalized after %d rows",
        user_id,
        migration.id,
        progress.rows_done,
        extra=extra,
    )
    return progress.rows_done


def _deadline(timeout: float | None) -> float | None:
    """Each transaction's own deadline."""
    return None if timeout is None else time.monotonic() + timeout
