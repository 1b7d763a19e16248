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
        owner=f"{setup.owner}-{os.getpid()}",
        policy=setup.policy,
        batching=Batching.of(setup.options),
    )
    _worker = (runner, setup.options)


def in_worker(action: str, user: User, to_version: int) -> Settled:
    """Run one user in a worker process (started by :class:`ProcessPool`)."""
    assert _worker is not None, "worker process not started"
    runner, options = _worker
    return settle(runner, action, user, to_version, options, None)


class ProcessPool(ProcessPoolExecutor):
    """Worker processes (spawned) for CPU-bound fleets, each with its own runner."""

    def __init__(self, processes: int, setup: WorkerSetup) -> None:
        super().__init__(
            max_workers=processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(setup,),
        )
