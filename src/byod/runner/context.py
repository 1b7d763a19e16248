"""What the runner's parts read of the run they belong to (the :class:`Runner` is one).

The parts (reconcile, chain, step, trail) take this, not the runner's class, so each of
them depends only on what it uses and none of them on the module that puts them in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import sqlalchemy as sa

from byod.controlplane import Directory, Ledger
from byod.notify import Notifier
from byod.phased import Batching
from byod.registry import FunctionCalls, Registry
from byod.results import RowsProgress
from byod.runner.pages import Outcomes

if TYPE_CHECKING:
    from byod.crypto import Sealer

__all__ = ["RunContext"]


class RunContext(Protocol):
    """One runner's settings and stores, as its parts see them."""

    engine: sa.Engine
    registry: Registry
    sealer: Sealer
    directory: Directory
    ledger: Ledger
    notify: Notifier
    #: the fleet run the user's rows belong to (None for one user run alone)
    run_id: str | None
    #: the name its leases are held under
    owner: str
    #: each instance transaction's bound, in seconds (None: unbounded)
    timeout: float | None
    batching: Batching
    on_rows: Callable[[RowsProgress], None] | None
    #: the migrations are an Alembic history (an unadopted instance is refused)
    alembic: bool
    #: where a fleet run's last steps wait to be recorded in batches (None: at once)
    outcomes: Outcomes | None

    def deadline(self) -> float | None:
        """One instance transaction's deadline (``time.monotonic()`` based)."""

    def app_deployment(self) -> FunctionCalls | None:
        """``ctx.app``: the app's own Convex deployment, where one is configured."""
