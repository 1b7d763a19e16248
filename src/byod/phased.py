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

from byod.errors import DriftError, MigrationFailedError, StoppedError, TransactionLimitError
from byod.logs import fields
from byod.registry import Backfill, Step
from byod.spec import FleetOptions
from byod.targets import Target
from byod.targets.backfill import Progress
from byod.targets.base import BatchBody, StepBody

__all__ = ["Batching", "PageSizer", "PhaseBodies", "run_phased"]

#: passing pages in a row before a shrunk page size doubles again
GROW_AFTER = 3

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


@dataclass
class PageSizer:
    """Pages that fit the instance's transaction limits: a page that hit them (nothing of
    it kept, the cursor where it was) is tried again at half the size, down to one row;
    after :data:`GROW_AFTER` pages in a row pass, the size doubles back towards the
    declared one."""

    declared: int
    size: int = 0
    smallest: int = 0
    limits: int = 0
    _passed: int = 0

    def __post_init__(self) -> None:
        self.size = self.smallest = self.declared

    def shrink(self) -> bool:
        """After a page hit a limit: halve the size; False when it is one row already."""
        if self.size <= 1:
            return False
        self.size = max(1, self.size // 2)
        self.smallest = min(self.smallest, self.size)
        self.limits += 1
        self._passed = 0
        return True

    def passed(self) -> None:
        """After a page that passed."""
        self._passed += 1
        if self.size < self.declared and self._passed >= GROW_AFTER:
            self.size = min(self.declared, self.size * 2)
            self._passed = 0

    def summary(self, table: str) -> str | None:
        """What the ledger keeps of the sizes used (None: the declared size always fit)."""
        if not self.limits:
            return None
        return (
            f"{table}: pages of {self.declared} hit the transaction limit {self.limits} "
            f"time{'s' if self.limits != 1 else ''}; {self.smallest} the smallest, "
            f"{self.size} the last"
        )


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
    on_pages: Callable[[str], None] = lambda summary: None,
) -> int | None:
    """Bring a phased step to its end (resuming it if it is in progress); returns the
    rows its backfills did in all, or None when the instance's stamp shows it done
    already. ``on_rows`` hears the rows done (when the step starts or resumes, and after
    each batch), and the estimated total. ``log_fields``: the event fields of the step's
    log records (``--log-format json``: run, user, migration, direction). ``on_pages``
    hears, once a backfill ends or fails, how its page sizes went when a page hit the
    instance's transaction limit (see :class:`PageSizer`)."""
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
        sizer = PageSizer(batching.size or work.batch_size)
        body = bodies.batch(index)
        try:
            progress = _run_backfill(
                target, step, progress, work, sizer, body, timeout, batching, on_rows, extra
            )
        finally:
            summary = sizer.summary(work.table)
            if summary is not None:
                on_pages(summary)
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


def _run_backfill(
    target: Target,
    step: Step,
    progress: Progress,
    work: Backfill,
    sizer: PageSizer,
    body: BatchBody,
    timeout: float | None,
    batching: Batching,
    on_rows: Callable[[int, int | None], None],
    extra: Mapping[str, object],
) -> Progress:
    """One backfill, batch by batch, from ``progress`` to its end; where it ends."""
    migration = step.migration
    while True:
        try:
            batch = target.apply_batch(step, progress, work, sizer.size, body, _deadline(timeout))
        except TransactionLimitError as exc:
            if not sizer.shrink():
                raise
            log.warning(
                "%s: a page of %s hit the instance's transaction limit; trying %d rows: %s",
                migration.id,
                work.table,
                sizer.size,
                exc.message,
                extra=extra,
            )
            continue
        sizer.passed()
        progress = batch.progress
        on_rows(progress.rows_done, progress.rows_total)
        if batch.finished:
            return progress
        if batching.stop is not None and batching.stop.is_set():
            raise StoppedError(
                f"{migration.id}: the run was stopped with {progress.rows_done} of the "
                "step's rows done; the step resumes at its cursor on the next run"
            )
        if batching.pause:
            time.sleep(batching.pause)


def _deadline(timeout: float | None) -> float | None:
    """Each transaction's own deadline."""
    return None if timeout is None else time.monotonic() + timeout
