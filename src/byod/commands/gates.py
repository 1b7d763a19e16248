"""``byod gate list``, ``byod gate open``, ``byod gate close``: the fleet's gates (see
:mod:`byod.gates`)."""

from __future__ import annotations

from byod.controlplane.gates import GateView, gate_views
from byod.controlplane.runs import local_user
from byod.gates import close_gate, open_gate
from byod.workspace import Workspace

__all__ = ["GateView", "change_gate", "list_gates"]


def list_gates(ws: Workspace) -> list[GateView]:
    """Every gated migration of the folder, oldest first."""
    ws.require_tables()
    return gate_views(ws.engine, ws.registry)


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
