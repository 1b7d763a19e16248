"""One task of a distributed run, as a worker process runs it (no task-queue code here).

The task claims its row, runs the user with the same per-user step as an in-process
fleet run (lease, stamp, ledger, retries), records the end once, and hands out the
run's next users. A task whose run was halted or stopped is discarded without touching
the instance; a duplicate of a finished task does nothing; a duplicate of a running one
waits for it (or for its lease to expire, when its worker died).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import socket
from collections.abc import Iterator

from byod.controlplane import Claim, User
from byod.controlplane.slots import server_slot
from byod.credentials import unseal_config
from byod.distributed.dispatch import Dispatcher, registry_digest
from byod.errors import BusyError, ByodError, ControlPlaneError
from byod.fleet import FleetFailure, Settled, settle
from byod.phased import Batching
from byod.runner import Runner

__all__ = ["TaskHandler", "worker_name"]

log = logging.getLogger("byod.distributed")

#: Seconds a task waits before trying again for a slot on a busy database server.
HOST_WAIT_SECONDS = 1.0


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

    def handle(self, run_id: str, user_id: int) -> float | None:
        """Run one user's task; returns seconds to wait before trying the task again
        (a duplicate waiting for its twin, a database server at its cap), else None."""
        claim = self.dispatcher.claim(run_id, user_id, self.name)
        if claim is None:
            log.warning("task for user %s of run %s: no such task; dropped", user_id, run_id)
            return None
        user = User(user_id, claim.clerk_id)
        if not claim.claimed:
            if claim.task_state != "done":  # the run stopped: never touch the instance
                log.info("run %s stopped: user %s not started", run_id, user_id)
                self.dispatcher.finish(run_id, Settled(user, "not_started", None, 0))
            else:  # a duplicate, or a retry whose end was recorded but not its sequel
                self.dispatcher.top_up(run_id)
            return None
        if claim.spec.migrations != self.digest:
            message = (
                f"worker {self.name} has other migrations than run {run_id}: deploy the same "
                "migrations folder to every worker"
            )
            log.error(message)
            self.dispatcher.finish(
                run_id, Settled(user, "failed", None, 0, FleetFailure(user.clerk_id, None, message))
            )
            return None
        with self._host_slot(user_id, claim) as free:
            if not free:
                return HOST_WAIT_SECONDS * random.uniform(0.5, 1.5)
            settled = self._run(run_id, user, claim)
        if self._twin_running(run_id, settled):
            return _retry_delay(claim)
        if self._moved_already(run_id, settled):
            # an earlier delivery moved the user, and its end went unrecorded
            settled = dataclasses.replace(settled, outcome="succeeded")
        self.dispatcher.finish(run_id, settled)
        return None

    def _run(self, run_id: str, user: User, claim: Claim) -> Settled:
        options = claim.spec.options
        runner = self.runner.configured(
            run_id=run_id,
            timeout=options.timeout,
            lease_seconds=options.lease_seconds,
            owner=f"{run_id}:{self.name}"[:64],
            batching=Batching.of(options),
        )
        # a control plane out of reach is not the user's failure: the task waits for it
        return settle(
            runner,
            "migrate",
            user,
            claim.target_version,
            options,
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


def _retry_delay(claim: Claim) -> float:
    lease = claim.spec.options.lease_seconds
    return max(0.5, min(10.0, lease / 3)) * random.uniform(0.8, 1.2)
