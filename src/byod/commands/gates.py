"""``byod gate list|open|close``: the fleet's gates (see :mod:`byod.gates`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from byod.controlplane.gates import gate_records, holders
from byod.controlplane.runs import local_user
from byod.gates import close_gate, open_gate
from byod.workspace import Workspace

__all__ = ["GateView", "change_gate", "list_gates"]


@dataclass(frozen=True)
class GateView:
    """A gated migration of the folder: its gate's state (``closed`` until opened), who
    changed it and when, the users left behind then, and how many eligible users are
    not through the steps before it (``waiting``) or past it (``through``)."""

    migration_id: str
    version: int
    state: str
    changed_by: str | None
    changed_at: datetime | None
    excluded: tuple[int, ...]
    waiting: int
    through: int


def list_gates(ws: Workspace) -> list[GateView]:
    """Every gated migration of the folder, oldest first."""
    ws.require_tables()
    records = gate_records(ws.engine)
    views = []
    for migration in ws.registry:
        if not migration.gated:
            continue
        record = records.get(migration.id)
        views.append(
            GateView(
                migration.id,
                migration.version,
                record.state if record else "closed",
                record.changed_by if record else None,
                record.changed_at if record else None,
                record.excluded if record else (),
                holders(ws.engine, below=migration.version - 1).count,
                holders(ws.engine, above=migration.version - 1).count,
            )
        )
    return views


def change_gate(
    ws: Workspace, step: str, state: str, excluding: tuple[str, ...] = (), by: str | None = None
) -> GateView:
    """Open (``state`` ``open``) or close again the gate of migration ``step`` (its id
    or version); ``excluding`` names the users left behind (byod ids or clerk ids)."""
    ws.require_tables()
    excluded = {ws.directory.find_user(ref).id for ref in excluding}
    change = open_gate if state == "open" else close_gate
    change(ws.engine, ws.registry, step, by or local_user(), excluded)
    (view,) = [v for v in list_gates(ws) if step in (v.migration_id, str(v.version))]
    return view
