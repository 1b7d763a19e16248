"""One task of a distributed run, as a worker process runs it (no task-queue code here).

A task is a page of one run's users. It claims their rows in one statement, runs each
user with the same per-user step as an in-process fleet run (lease, stamp, ledger,
retries), with the page's leases, plans and outcomes written in batches as an
in-process run's are (:mod:`byod.runner.pages`), records their ends in batches (once
each), and hands out the run's next users. A task whose run was halted or stopped is
discarded without touching the instance; a duplicate of a finished task does nothing; a
duplicate of a running one waits for it (or for its lease to expire, when its worker
died).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import socket
import time
from collections.abc import Iterator, Sequence

from byod.controlplane import Claim, User
from byod.controlplane.slots import server_slot
from byod.credentials import unseal_config
from byod.distributed.dispatch import Dispatcher, registry_digest
from byod.errors import BusyError, ByodError, ControlPlaneError
from byod.fleet import FleetFailure, Settled, settle
from byod.phased import Batching
from byod.runner import Runner
from byod.runner.pages import FLUSH_SECONDS, Claims, Outcomes

__all__ = ["TaskHandler", "worker_name"]

log = logging.getLogger("byod.distributed")

#: Seconds a task waits before trying again for a slot on a busy database server.
HOST_WAIT_SECONDS = 1.0
#: How long a task that ends waits for the control plane to take its last steps: after
#: that, the next delivery (or run) restores them from the instances' stamps.
OUTCOMES_PATIENCE_SECONDS = 5.0


def worker_name() -> str:
    """This worker process, as leases and task rows name it."""
    return f"{socket.gethostname()}:{os.getpid()}"


class TaskHandler:
    """Runs the tasks of distributed runs in one worker process, with its own runner."""

    def __init__(self, runner: Runner, dispatcher: Dispatcher, name: str | None = None) -> None:
        self.runner = runner
        self.dispatcher = dispatcher
        self.name = name or worker_name()
        self.digest = registry_digest(runner.registry)

    def handle(self, run_id: str, user_ids: Sequence[int]) -> float | None:
        """Run one task: a page of one run's users, one after the other. Returns seconds
        to wait before trying the task again when some user could not run now (a
        duplicate waiting for its twin, a database server at its cap): the users whose
        end is recorded are skipped then. Else None."""
        claims = self.dispatcher.claim(run_id, user_ids, self.name)
        ends: list[Settled] = []
        to_run: list[tuple[User, Claim]] = []
        for user_id in dict.fromkeys(user_ids):
            claim = claims.get(user_id)
            if claim is None:
                log.warning("task for user %s of run %s: no such task; dropped", user_id, run_id)
                continue
            user = User(user_id, claim.clerk_id)
            if not claim.claimed:
                if claim.task_state != "done":  # the run stopped: never touch the instance
                    log.info("run %s stopped: user %s not started", run_id, user_id)
                    ends.append(Settled(user, "not_started", None, 0))
            elif claim.spec.migrations != self.digest:
                message = (
                    f"worker {self.name} has other migrations than run {run_id}: deploy the "
                    "same migrations folder to every worker"
                )
                log.error(message)
                failure = FleetFailure(user.clerk_id, None, message)
                ends.append(Settled(user, "failed", None, 0, failure))
            else:
                to_run.append((user, claim))
        if not to_run:
            # a duplicate, or a retry whose ends were recorded but not their sequel
            if not ends or self.dispatcher.finish(run_id, ends) is None:
                self.dispatcher.top_up(run_id)
            return None
        return _Page(self, run_id, to_run[0][1]).run(to_run, ends)

    def _run(self, runner: Runner, user: User, claim: Claim) -> Settled:
        # a control plane out of reach is not the user's failure: the task waits for it
        return settle(
            runner,
            "migrate",
            user,
            claim.target_version,
            claim.spec.options,
            None,
            reraise=(ControlPlaneError,),
        )

    def _moved_already(self, run_id: str, settled: Settled) -> bool:
        """Whether a user this delivery found with nothing to do was moved by this same
        run (an earlier delivery whose end could not be recorded: a lost control plane)."""
        result = settled.result
        if settled.outcome != "up_to_date" or result is None or result.error is not None:
            return False
        return self.runner.ledger.moved_in_run(settled.user.id, run_id)

    def _twin_running(self, run_id: str, settled: Settled) -> bool:
        """Whether another delivery of this same task holds the user's lease (alive, or
        dead with its lease not expired yet): then this one waits instead of ending."""
        if settled.result is None or not isinstance(settled.result.error, BusyError):
            return False
        try:
            owner = self.runner.directory.get_config(settled.user.id).lease_owner or ""
        except ByodError:
            return False
        return owner.startswith(f"{run_id}:")

    @contextlib.contextmanager
    def _host_slot(self, user_id: int, claim: Claim) -> Iterator[bool]:
        """One of the run's ``per_host`` slots on the user's database server (a
        PostgreSQL advisory lock held on a control-plane connection: a worker that dies
        gives its slot back with its connection). Yields False when all are taken."""
        per_host = claim.spec.per_host or 0
        host = self._host_of(user_id) if per_host else None
        if host is None:
            yield True
            return
        with server_slot(self.runner.engine, host, per_host) as free:
            yield free

    def _host_of(self, user_id: int) -> str | None:
        try:
            config = self.runner.directory.get_config(user_id)
            url = unseal_config(config, self.runner.sealer, policy=self.runner.policy).url
        except ByodError:
            return None  # the run itself reports why
        return None if url.host is None else f"{url.host}:{url.port or ''}"


class _Page:
    """One task's users run one after the other, their bookkeeping in pages: their
    leases claimed and plans written in one go before any instance is touched, their
    last steps and their tasks' ends recorded in batches at least every
    :data:`~byod.runner.pages.FLUSH_SECONDS` and when the page ends."""

    def __init__(self, handler: TaskHandler, run_id: str, first: Claim) -> None:
        self.handler = handler
        self.run_id = run_id
        options = first.spec.options
        self.runner = runner = handler.runner.configured(
            run_id=run_id,
            timeout=options.timeout,
            lease_seconds=options.lease_seconds,
            owner=f"{run_id}:{handler.name}"[:64],
            batching=Batching.of(options),
        )
        runner.claims = Claims(
            runner.directory, runner.ledger, runner.owner, run_id, runner.lease_seconds
        )
        runner.outcomes = Outcomes(runner.ledger)
        self.ends: list[Settled] = []
        self.flushed_at = time.monotonic()
        self.stopped = False

    def run(self, to_run: list[tuple[User, Claim]], ends: list[Settled]) -> float | None:
        runner, handler = self.runner, self.handler
        self.ends = ends
        retry: float | None = None
        assert runner.claims is not None and runner.outcomes is not None
        users = {user.id: (user, claim) for user, claim in to_run}
        try:
            runner.claims.claim(
                list(users),
                lambda config: runner.page_plan(
                    "migrate",
                    users[config.user_id][0],
                    config,
                    users[config.user_id][1].target_version,
                ),
            )
            for index, (user, claim) in enumerate(to_run):
                if self.stopped:  # halted or stopped meanwhile: the rest never starts
                    runner.claims.forget([u.id for u, _ in to_run[index:]])
                    self.ends.extend(Settled(u, "not_started", None, 0) for u, _ in to_run[index:])
                    break
                with handler._host_slot(user.id, claim) as free:
                    if free:
                        settled = handler._run(runner, user, claim)
                if not free:
                    runner.claims.forget([user.id])
                    retry = max(retry or 0.0, HOST_WAIT_SECONDS * random.uniform(0.5, 1.5))
                    continue
                if handler._twin_running(self.run_id, settled):
                    retry = max(retry or 0.0, _retry_delay(claim))
                    continue
                if handler._moved_already(self.run_id, settled):
                    # an earlier delivery moved the user, and its end went unrecorded
                    settled = dataclasses.replace(settled, outcome="succeeded")
                self.ends.append(settled)
                if time.monotonic() - self.flushed_at >= FLUSH_SECONDS:
                    self._record()
            self._record()
        finally:
            self._close()
        return retry

    def _record(self) -> None:
        """The last steps waiting written to the ledger, then the tasks' ends (and the
        run's next users handed out when that is due)."""
        assert self.runner.outcomes is not None
        self.runner.outcomes.flush()
        ends, self.ends = self.ends, []
        self.flushed_at = time.monotonic()
        if ends:
            run = self.handler.dispatcher.finish(self.run_id, ends)
            self.stopped = run is not None and run.state != "running"

    def _close(self) -> None:
        runner = self.runner
        try:
            assert runner.claims is not None
            runner.claims.release_all()
        except ByodError as exc:  # their leases lapse; the task's retry runs them
            log.warning("run %s: unstarted users not given back: %s", self.run_id, exc.message)
        finally:
            assert runner.outcomes is not None
            runner.outcomes.close(OUTCOMES_PATIENCE_SECONDS)


def _retry_delay(claim: Claim) -> float:
    lease = claim.spec.options.lease_seconds
    return max(0.5, min(10.0, lease / 3)) * random.uniform(0.8, 1.2)
