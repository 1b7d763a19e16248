"""One step on one instance: in one transaction with its stamp, or phased.

A plain step (and a ``down``) is one instance transaction that writes the stamp with it.
A step with backfills or a finalize runs its phases (:func:`byod.phased.run_phased`): the
schema change, then batches, then the finalize with the stamp, each bounded by the
timeout on its own. While it runs, the rows done reach the ledger every few seconds and
the run's listener after every batch. A rehearsal runs the same code with nothing
recorded.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from byod import metrics
from byod.context import Bodies
from byod.errors import ByodError, ControlPlaneError
from byod.logs import fields
from byod.phased import PhaseBodies, run_phased
from byod.registry import Step
from byod.results import RowsProgress
from byod.targets import Target

if TYPE_CHECKING:
    from byod.controlplane import User
    from byod.runner.context import RunContext

__all__ = ["ROWS_REPORT_SECONDS", "apply_step"]

#: How often a phased step's rows done are written to the ledger while it runs.
ROWS_REPORT_SECONDS = 3.0


def apply_step(
    runner: RunContext,
    user: User,
    step: Step,
    target: Target,
    deadline: float | None,
    *,
    record: bool = True,
) -> tuple[bool, int | None]:
    """One step: in one transaction, or phased (backfills), each phase bounded on its
    own by the timeout. Whether it was applied now, and a phased step's rows.
    ``record``: its rows done and page sizes go to the ledger (not in a rehearsal)."""
    bodies = Bodies(runner.engine, user, target.kind, app=runner.app_deployment())
    migration = step.migration
    if step.direction == "down":
        if target.kind != "convex" or not migration.reverse_backfills:
            return target.apply(step, bodies.step(step), deadline), None
        # undo pages first, then down (with the stamp), as the finalize would end it
        phases = PhaseBodies(
            schema=lambda conn: None,
            batch=lambda index: bodies.batch(step, index),
            finalize=bodies.step(step),
        )
    elif not migration.phased:
        return target.apply(step, bodies.step(step), deadline), None
    else:
        finalize = migration.finalize
        phases = PhaseBodies(
            schema=bodies.step(step),
            batch=lambda index: bodies.batch(step, index),
            finalize=bodies.step(step, finalize) if finalize else (lambda conn: None),
        )
    ledger = runner.ledger
    reported = [time.monotonic()]
    latest: list[tuple[int, int | None] | None] = [None]  # rows done, estimated total

    counted = metrics.BACKFILL_ROWS.labels(migration.id, target.kind)

    def on_rows(rows: int, total: int | None) -> None:  # the ledger every few seconds
        # the first call says where the step starts (or resumes): nothing done yet
        done_before = latest[0][0] if latest[0] is not None else rows
        counted.inc(max(0, rows - done_before))
        latest[0] = (rows, total)
        if runner.on_rows is not None:
            runner.on_rows(RowsProgress(user.id, migration.id, rows, total))
        if record and time.monotonic() - reported[0] >= ROWS_REPORT_SECONDS:
            ledger.record_rows(user.id, step, rows, total)
            reported[0] = time.monotonic()

    pages: list[str] = []

    def on_pages(summary: str) -> None:  # a page hit the instance's transaction limit
        pages.append(summary)
        if record:
            with contextlib.suppress(ControlPlaneError):  # the step's outcome comes first
                ledger.record_page_sizes(user.id, step, "; ".join(pages))

    try:
        rows = run_phased(
            target,
            step,
            phases,
            timeout=runner.timeout,
            batching=runner.batching,
            user_id=user.id,
            on_rows=on_rows,
            on_pages=on_pages,
            log_fields=fields(
                run_id=runner.run_id,
                user_id=user.id,
                clerk_id=user.clerk_id,
                migration=step.migration.id,
                direction=step.direction,
            ),
        )
    except ByodError:
        if record and latest[0] is not None:  # a failed or stopped attempt shows it
            with contextlib.suppress(ControlPlaneError):  # the step's error comes first
                ledger.record_rows(user.id, step, *latest[0])
        raise
    if rows is None:
        return False, None
    if record:
        ledger.record_rows(user.id, step, rows, latest[0][1] if latest[0] else None)
    return True, rows
