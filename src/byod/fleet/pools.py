"""Worker processes for CPU-bound fleets.

Threads share one core in CPython; ``--processes`` spawns worker processes (spawn, not
fork: a forked child would inherit open database connections), each building its own
runner from a :class:`WorkerSetup` sent once at its start.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from byod.controlplane import User
from byod.fleet.outcome import Settled, settle
from byod.instance_url import InstancePolicy
from byod.phased import Batching
from byod.runner import Runner
from byod.runner.pages import Claimed, Claims, Handed, Outcomes
from byod.spec import FleetOptions

__all__ = ["ProcessPool", "WorkerSetup", "in_worker"]


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker process needs to build its own runner (sent once, at its start)."""

    control_plane: str = field(repr=False)
    migrations: str
    key: bytes = field(repr=False)
    run_id: str
    options: FleetOptions
    owner: str
    notify_hook: str | None = None
    policy: InstancePolicy = field(default_factory=InstancePolicy)
    keep_alembic_version: bool = False
    #: the run claims its users a page at a time (in the parent, under ``owner``) and
    #: records their last steps in batches: the workers hand theirs back with each user
    paged: bool = False


_worker: tuple[Runner, FleetOptions] | None = None


def _start_worker(setup: WorkerSetup) -> None:
    """Initializer of a worker process: Ctrl-C is the parent's to handle; own runner."""
    global _worker  # noqa: PLW0603 - one runner per worker process, by design
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the parent reports each user's outcome; without a handler Python's last resort
    # would print this process's warnings on the operator's terminal as well
    logging.getLogger("byod").addHandler(logging.NullHandler())
    logging.getLogger("byod").propagate = False
    from byod.controlplane import open_engine
    from byod.crypto import Sealer
    from byod.notify import load_notifier
    from byod.sources import load_registry

    runner = Runner(
        open_engine(setup.control_plane),
        load_registry(Path(setup.migrations), keep_alembic_version=setup.keep_alembic_version),
        Sealer(setup.key),
        notify=load_notifier(setup.notify_hook),
        lease_seconds=setup.options.lease_seconds,
        timeout=setup.options.timeout,
        run_id=setup.run_id,
        owner=setup.owner if setup.paged else f"{setup.owner}-{os.getpid()}",
        policy=setup.policy,
        batching=Batching.of(setup.options),
    )
    if setup.paged:
        runner.claims = Claims(
            runner.directory, runner.ledger, runner.owner, setup.run_id, runner.lease_seconds
        )
        runner.outcomes = Outcomes(runner.ledger, background=False)
    _worker = (runner, setup.options)


def in_worker(
    action: str, user: User, to_version: int, claimed: Claimed | None = None
) -> tuple[Settled, Handed | None]:
    """Run one user in a worker process (started by :class:`ProcessPool`), with the
    claim the run's parent made for it; returns how it ended and, in a paged run, its
    last step for the parent to record with its next batch."""
    assert _worker is not None, "worker process not started"
    runner, options = _worker
    if claimed is not None and runner.claims is not None:
        runner.claims.put(user.id, claimed)
    settled = settle(runner, action, user, to_version, options, None)
    return settled, None if runner.outcomes is None else runner.outcomes.drain()


class ProcessPool(ProcessPoolExecutor):
    """Worker processes (spawned) for CPU-bound fleets, each with its own runner."""

    def __init__(self, processes: int, setup: WorkerSetup) -> None:
        super().__init__(
            max_workers=processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(setup,),
        )
