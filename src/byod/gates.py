"""Fleet gates (expand/contract): a gated migration — a contract step (drop a column, make
a field required) — runs on no user until every eligible user of the fleet is through the
steps before it and an operator has opened it, because the app's own code must be
redeployed between expand and contract and only the operator knows when it has been.

* :meth:`Gates.cut` ends a user's plan before a step it may not take yet, saying what
  holds it: users not through (named), or "not opened". Up: a gated step whose gate is not
  open. Down (the mirror): a step below an open gate — undoing the expand while some
  code may still rely on it — until the operator closes the gate again.
* :func:`open_gate` is refused while eligible users are not through the steps before the
  gate, unless the operator names them as left behind (``excluding``); :func:`close_gate`
  likewise while users are past it. Once open, a gate stays open: users added later go
  through alone.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass

import sqlalchemy as sa

from byod.controlplane.gates import GateRecord, gate_records, holders, set_gate
from byod.errors import InputError, PlanError
from byod.registry import Migration, Plan, Registry

__all__ = ["Gates", "Hold", "close_gate", "find_gated", "open_gate"]


@dataclass(frozen=True)
class Hold:
    """Why a user stopped before ``migration_id``: its gate, and who or what holds it."""

    migration_id: str
    reason: str


class Gates:
    """The fleet's gates as one run sees them: read once, on first use (a gate opened
    meanwhile is passed by the next run), safe from several threads."""

    def __init__(self, engine: sa.Engine, registry: Registry) -> None:
        self.engine = engine
        self.registry = registry
        self._gated = [m for m in registry if m.gated]
        self._records: dict[str, GateRecord] | None = None
        self._reasons: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def cut(self, plan: Plan) -> tuple[Plan, Hold | None]:
        """``plan`` up to the first step a gate holds (all of it when none does), and
        what holds that step."""
        if not self._gated:
            return plan, None
        for index, step in enumerate(plan.steps):
            hold = self._hold(step.migration, plan.direction)
            if hold is not None:
                kept = plan.steps[:index]
                reached = kept[-1].version_after if kept else plan.from_version
                return Plan(plan.direction, plan.from_version, reached, kept), hold
        return plan, None

    def _hold(self, migration: Migration, direction: str) -> Hold | None:
        if direction == "up":
            if not migration.gated or self._state(migration.id) == "open":
                return None
            return Hold(migration.id, self._reason(migration, "up"))
        above = [g for g in self._gated if g.version > migration.version]
        for gate in above:
            if self._state(gate.id) == "open":
                return Hold(gate.id, self._reason(gate, "down"))
        return None

    def _state(self, migration_id: str) -> str:
        with self._lock:
            if self._records is None:
                self._records = gate_records(self.engine)
            record = self._records.get(migration_id)
        return record.state if record is not None else "closed"

    def explain(self, migration_id: str, direction: str) -> str:
        """What holds the gate of ``migration_id`` now (asked afresh)."""
        gate = self.registry.get(migration_id)
        if gate is None:
            return f"gate {migration_id}"
        with self._lock:
            self._reasons.pop((gate.id, direction), None)
        return self._reason(gate, direction)

    def _reason(self, gate: Migration, direction: str) -> str:
        key = (gate.id, direction)
        with self._lock:
            if key in self._reasons:
                return self._reasons[key]
        if direction == "up":
            waiting = holders(self.engine, below=gate.version - 1)
            reason = (
                f"gate {gate.id} is not open: {waiting.describe()} not through the steps before it"
                if waiting.count
                else f"gate {gate.id} is not open: every user is through the steps before "
                f"it; open it (`byod gate open {gate.id}`) once the app's code for it is "
                "deployed"
            )
        else:
            past = holders(self.engine, above=gate.version - 1)
            reason = (
                f"gate {gate.id} is open: {past.describe()} still past it"
                if past.count
                else f"gate {gate.id} is open: close it (`byod gate close {gate.id}`) once "
                "the app's code that needs it is rolled back"
            )
        with self._lock:
            self._reasons[key] = reason
        return reason


def find_gated(registry: Registry, ref: str) -> Migration:
    """The gated migration ``ref`` names (its id, or its version); :class:`InputError`."""
    migration = registry.get(ref)
    if migration is None and ref.isdigit() and ref.isascii():
        migration = registry.at(int(ref))
    if migration is None:
        raise InputError(f"no migration {ref!r} in the migrations folder")
    if not migration.gated:
        raise InputError(
            f"{migration.id} is not gated: a gate is declared in the migration "
            "(Migration(..., gated=True))"
        )
    return migration


def open_gate(
    engine: sa.Engine, registry: Registry, ref: str, by: str, excluding: Collection[int] = ()
) -> GateRecord:
    """Open the gate of migration ``ref``: refused (:class:`PlanError`, naming them) while
    eligible users not in ``excluding`` are not through the steps before it."""
    gate = find_gated(registry, ref)
    waiting = holders(engine, below=gate.version - 1, excluded=excluding)
    if waiting.count:
        raise PlanError(
            f"gate {gate.id} cannot open: {waiting.describe()} not through the steps before it",
            hint="Migrate them first (`byod migrate --all`), or name those left behind with "
            "--excluding USER (they pass the gate alone later).",
        )
    return set_gate(engine, gate.id, "open", by, excluding)


def close_gate(
    engine: sa.Engine, registry: Registry, ref: str, by: str, excluding: Collection[int] = ()
) -> GateRecord:
    """Close the gate of migration ``ref`` again, so rollbacks may cross below it:
    refused (:class:`PlanError`) while users not in ``excluding`` are past it."""
    gate = find_gated(registry, ref)
    past = holders(engine, above=gate.version - 1, excluded=excluding)
    if past.count:
        raise PlanError(
            f"gate {gate.id} cannot close: {past.describe()} still past it",
            hint=f"Roll them back before it first (`byod rollback USER --to {gate.version - 1}`"
            " or `byod rollback --run RUN`), or name them with --excluding USER.",
        )
    return set_gate(engine, gate.id, "closed", by, excluding)
