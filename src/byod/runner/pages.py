"""A fleet run's bookkeeping in pages: leases and plans written a page of users at a
time before any of their instances is touched, last steps (and the checksums of the
migrations first applied) recorded in batches.

:class:`Claims` holds the users a run claimed (one statement a page for their leases,
one to read their ledger, one to write their plans: the first step ``running``, the rest
``pending``, as a lone user's would be) until a worker takes each; the run's stop gives
back what no worker took (their leases released, their plans forgotten: nothing ran).

:class:`Outcomes` keeps each user's last completed step until it is written with others
in one transaction, at least every :data:`FLUSH_SECONDS` and when the run ends. The
instance's stamp stays the truth: a batch lost with its process leaves its rows
``running`` under a lease that lapses, and the next run settles them from the stamps
(``completed``), so nothing is applied twice and nothing is left ``running``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from byod.clock import utcnow
from byod.controlplane import Config, Directory, Ledger, record_applied_checksum
from byod.controlplane.ledger import CompletedStep
from byod.errors import ByodError, ControlPlaneError
from byod.registry import Migration, Plan, Registry, Step

__all__ = ["FLUSH_SECONDS", "Claimed", "Claims", "Handed", "Outcomes", "plan_key"]

log = logging.getLogger("byod.runner")

#: How long a completed last step waits, at most, to be written with others.
FLUSH_SECONDS = 0.1


def plan_key(plan: Plan) -> tuple[tuple[str, str], ...]:
    """What makes two plans the same rows in the ledger: their steps, in order."""
    return tuple((step.migration.id, step.direction) for step in plan.steps)


@dataclass
class Claimed:
    """A user whose lease the run holds, not started yet: its config as claimed and the
    plan written for it (empty: none was; see :meth:`Claims.claim`)."""

    config: Config
    planned: tuple[tuple[str, str], ...] = ()
    attempt: int = 0
    #: the chain ran the written plan (else its rows are forgotten when the user ends)
    used: bool = False
    #: when the lease was claimed (``time.monotonic()``)
    at: float = dataclasses.field(default_factory=time.monotonic)


class Claims:
    """The users this run claimed and no worker has taken yet; safe between threads."""

    def __init__(
        self,
        directory: Directory,
        ledger: Ledger,
        owner: str,
        run_id: str | None,
        lease_seconds: float,
    ) -> None:
        self.directory = directory
        self.ledger = ledger
        self.owner = owner
        self.run_id = run_id
        self.lease_seconds = lease_seconds
        self._lock = threading.Lock()
        self._waiting: dict[int, Claimed] = {}

    def claim(self, user_ids: list[int], plan_for: Callable[[Config], Plan | None]) -> set[int]:
        """Claim a page of users' leases and write their plans (``plan_for`` a config:
        the steps it would run at the control plane's version; None for a user that
        gets no plan written: it plans when it starts, as a lone user does). Users
        whose lease another runner holds are left out. Returns the ids claimed."""
        configs = self.directory.claim_leases(user_ids, self.owner, self.lease_seconds)
        if not configs:
            return set()
        counts = self.ledger.page_counts([config.user_id for config in configs])
        claimed: dict[int, Claimed] = {}
        plans: dict[int, Plan] = {}
        for config in configs:
            open_rows = counts.open_rows.get(config.user_id, 0)
            claimed[config.user_id] = Claimed(_with_open_rows(config, open_rows))
            plan = None if open_rows else plan_for(config)  # a lost runner's rows first
            if plan is not None and not plan.empty:
                plans[config.user_id] = plan
        try:
            attempts = self.ledger.record_planned_page(plans, counts, self.run_id)
        except ControlPlaneError:
            self.directory.release_leases(list(claimed), self.owner)
            raise
        for user_id, plan in plans.items():
            claimed[user_id].planned = plan_key(plan)
            claimed[user_id].attempt = attempts[user_id]
        with self._lock:
            self._waiting.update(claimed)
        return set(claimed)

    def put(self, user_id: int, claimed: Claimed) -> None:
        """Hold a claim made elsewhere (by the run's parent process, for a worker
        process that starts the user now)."""
        with self._lock:
            self._waiting[user_id] = dataclasses.replace(claimed, at=time.monotonic())

    def take(self, user_id: int) -> Claimed | None:
        """The user's claim, for the worker that starts it (once); None if not claimed,
        or if its lease, waiting a third of its life already, was lost meanwhile (the
        worker then claims it as a lone user's run does)."""
        with self._lock:
            claimed = self._waiting.pop(user_id, None)
        if claimed is None or time.monotonic() - claimed.at < self.lease_seconds / 3:
            return claimed
        if self.directory.renew_lease(user_id, self.owner, self.lease_seconds):
            return claimed
        log.warning("user %s: its lease lapsed before it started; claiming it again", user_id)
        return None

    def forget(self, user_ids: Iterable[int]) -> None:
        """Users that will not start: their plans forgotten, their leases given back."""
        with self._lock:
            left = [uid for uid in user_ids if self._waiting.pop(uid, None) is not None]
        if left:
            self.ledger.drop_planned(left, self.run_id)
            self.directory.release_leases(left, self.owner)

    def release_all(self) -> None:
        """Whatever no worker took (the run stopped): plans forgotten, leases back."""
        with self._lock:
            left = list(self._waiting)
        self.forget(left)


#: Last steps a worker process completed, handed to the run's parent to record: per
#: step (user, migration, direction, lease owner, started, completed); and the ids of
#: the migrations first applied (see :meth:`Outcomes.drain`).
Handed = tuple[list[tuple[int, str, str, str, datetime, datetime]], list[str]]


class Outcomes:
    """Last steps completed, written in batches by one thread (see the module); with
    ``background`` False there is no thread: they wait for :meth:`flush` or
    :meth:`drain` (a worker process hands them to the run's parent)."""

    def __init__(
        self, ledger: Ledger, seconds: float = FLUSH_SECONDS, *, background: bool = True
    ) -> None:
        self.ledger = ledger
        self.seconds = seconds
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._waiting: list[CompletedStep] = []
        self._checksums: list[Migration] = []  # applied first in this run, not kept yet
        self._noted: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="byod-outcomes", daemon=True)
        if background:
            self._thread.start()

    def add(self, user_id: int, step: Step, owner: str, started_at: datetime) -> None:
        """The user's last step (begun at ``started_at``) is done on its instance now:
        record it (and move its version, give its lease back) with the next batch."""
        done = CompletedStep(user_id, step, owner, started_at, utcnow())
        with self._lock:
            self._waiting.append(done)

    def note_applied(self, migration: Migration) -> None:
        """Keep ``migration``'s checksum as first applied, with the next batch (once per
        run: the control plane keeps the first one written anywhere)."""
        with self._lock:
            if migration.id not in self._noted:
                self._noted.add(migration.id)
                self._checksums.append(migration)

    def drain(self) -> Handed:
        """What waits, taken out to be recorded by another process (see :data:`Handed`)."""
        with self._lock:
            batch, self._waiting = self._waiting, []
            checksums, self._checksums = self._checksums, []
        steps: list[tuple[int, str, str, str, datetime, datetime]] = [
            (
                s.user_id,
                s.step.migration.id,
                s.step.direction,
                s.owner,
                s.started_at,
                s.completed_at,
            )
            for s in batch
        ]
        return steps, [migration.id for migration in checksums]

    def take_over(self, handed: Handed, registry: Registry) -> None:
        """Record with the next batch what a worker process :meth:`drain`-ed."""
        steps, applied = handed
        done = []
        for user_id, migration_id, direction, owner, started_at, completed_at in steps:
            migration = registry.get(migration_id)
            if migration is not None:
                step = Step(migration, "up" if direction == "up" else "down")
                done.append(CompletedStep(user_id, step, owner, started_at, completed_at))
        with self._lock:
            self._waiting.extend(done)
        for migration_id in applied:
            migration = registry.get(migration_id)
            if migration is not None:
                self.note_applied(migration)

    def flush(self) -> None:
        """Write what waits now (raises :class:`ControlPlaneError`; nothing is lost: it
        waits for the next try)."""
        with self._flushing:
            self._flush_checksums()
            with self._lock:
                batch, self._waiting = self._waiting, []
            if not batch:
                return
            try:
                done = self.ledger.record_last_steps(batch)
            except ControlPlaneError:
                with self._lock:
                    self._waiting[:0] = batch
                raise
            if done != len(batch) and done >= 0:
                log.warning(
                    "%d of %d steps were no longer running when recorded: another runner "
                    "took those users' leases and settled their rows from the stamps",
                    len(batch) - done,
                    len(batch),
                )

    def _flush_checksums(self) -> None:
        while True:
            with self._lock:
                if not self._checksums:
                    return
                migration = self._checksums[0]
            record_applied_checksum(self.ledger.engine, migration)
            with self._lock:
                self._checksums.pop(0)

    def close(self, patience: float) -> None:
        """Stop the thread and write the rest, waiting up to ``patience`` seconds for a
        control plane out of reach; after that what is left is restored from the
        instances' stamps by the next run (said in the log)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        give_up = time.monotonic() + patience
        delay = 0.2
        while True:
            try:
                self.flush()
                return
            except ByodError as exc:
                if time.monotonic() + delay > give_up:
                    with self._lock:
                        left = len(self._waiting)
                    log.error(
                        "%d completed steps not recorded: %s; the next run records them "
                        "from the instances' stamps",
                        left,
                        exc.message,
                    )
                    return
                time.sleep(delay)
                delay = min(5.0, delay * 2)

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            try:
                self.flush()
            except ByodError as exc:
                log.warning("cannot record completed steps yet: %s; trying again", exc.message)


def _with_open_rows(config: Config, open_rows: int) -> Config:
    if open_rows == config.open_rows:
        return config
    return dataclasses.replace(config, open_rows=open_rows)
