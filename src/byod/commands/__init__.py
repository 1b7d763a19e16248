"""The commands, as plain functions of a :class:`~byod.workspace.Workspace` (Alembic's
``command`` style).

Each opens what it needs, calls the core (runner, fleet, control plane) and returns plain
data; every front end (the command line, the HTTP service and its dashboard, the task
queue's worker) calls these and only renders what they return.

Each command's module is imported the first time one of its names is used (PEP 562), so a
front end that runs one command never pays for importing the others (the fleet, Alembic,
the HTTP client for Convex).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from byod.commands.adoption import Accepted, accept_checksum, adopt
    from byod.commands.demo import DemoResult, run_demo
    from byod.commands.gates import GateView, change_gate, list_gates
    from byod.commands.onboarding import check_pending, import_users, read_import
    from byod.commands.reports import (
        InstanceView,
        RunDetails,
        RunTimeline,
        VerifyReport,
        caller,
        fleet_over_runs,
        get_run,
        history_of,
        instance,
        instance_busy,
        list_runs,
        list_users,
        pending,
        pending_migrations,
        run_timeline,
        runs_rows,
        show_run,
        status,
        user_history,
        verify,
    )
    from byod.commands.runs import (
        UserPlan,
        follow,
        migrate_distributed,
        migrate_fleet,
        migrate_user,
        plan,
        rehearse_fleet,
        rehearse_then_migrate,
        rehearse_user,
        repair,
        resolve_users,
        rollback_fleet_run,
        rollback_user,
        stop_run,
        task_handler,
        warm_up,
    )
    from byod.commands.setup import (
        InitResult,
        add_user,
        check_service,
        check_worker,
        connect,
        disconnect,
        init,
        new_migration,
        remove_user,
    )

_EXPORTS = {
    "DemoResult": "byod.commands.demo",
    "GateView": "byod.commands.gates",
    "change_gate": "byod.commands.gates",
    "list_gates": "byod.commands.gates",
    "adopt": "byod.commands.adoption",
    "Accepted": "byod.commands.adoption",
    "accept_checksum": "byod.commands.adoption",
    "check_pending": "byod.commands.onboarding",
    "import_users": "byod.commands.onboarding",
    "read_import": "byod.commands.onboarding",
    "InitResult": "byod.commands.setup",
    "InstanceView": "byod.commands.reports",
    "RunDetails": "byod.commands.reports",
    "RunTimeline": "byod.commands.reports",
    "fleet_over_runs": "byod.commands.reports",
    "run_timeline": "byod.commands.reports",
    "UserPlan": "byod.commands.runs",
    "VerifyReport": "byod.commands.reports",
    "add_user": "byod.commands.setup",
    "caller": "byod.commands.reports",
    "check_service": "byod.commands.setup",
    "check_worker": "byod.commands.setup",
    "connect": "byod.commands.setup",
    "disconnect": "byod.commands.setup",
    "follow": "byod.commands.runs",
    "get_run": "byod.commands.reports",
    "history_of": "byod.commands.reports",
    "init": "byod.commands.setup",
    "instance": "byod.commands.reports",
    "instance_busy": "byod.commands.reports",
    "list_runs": "byod.commands.reports",
    "list_users": "byod.commands.reports",
    "migrate_distributed": "byod.commands.runs",
    "migrate_fleet": "byod.commands.runs",
    "migrate_user": "byod.commands.runs",
    "new_migration": "byod.commands.setup",
    "pending": "byod.commands.reports",
    "pending_migrations": "byod.commands.reports",
    "plan": "byod.commands.runs",
    "rehearse_fleet": "byod.commands.runs",
    "rehearse_then_migrate": "byod.commands.runs",
    "rehearse_user": "byod.commands.runs",
    "remove_user": "byod.commands.setup",
    "repair": "byod.commands.runs",
    "resolve_users": "byod.commands.runs",
    "rollback_fleet_run": "byod.commands.runs",
    "rollback_user": "byod.commands.runs",
    "run_demo": "byod.commands.demo",
    "runs_rows": "byod.commands.reports",
    "show_run": "byod.commands.reports",
    "status": "byod.commands.reports",
    "stop_run": "byod.commands.runs",
    "task_handler": "byod.commands.runs",
    "user_history": "byod.commands.reports",
    "verify": "byod.commands.reports",
    "warm_up": "byod.commands.runs",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next use is a plain lookup
    return value


__all__ = [
    "Accepted",
    "DemoResult",
    "GateView",
    "InitResult",
    "InstanceView",
    "RunDetails",
    "RunTimeline",
    "UserPlan",
    "VerifyReport",
    "accept_checksum",
    "add_user",
    "adopt",
    "caller",
    "change_gate",
    "check_pending",
    "check_service",
    "check_worker",
    "connect",
    "disconnect",
    "fleet_over_runs",
    "follow",
    "get_run",
    "history_of",
    "import_users",
    "init",
    "instance",
    "instance_busy",
    "list_gates",
    "list_runs",
    "list_users",
    "migrate_distributed",
    "migrate_fleet",
    "migrate_user",
    "new_migration",
    "pending",
    "pending_migrations",
    "plan",
    "read_import",
    "rehearse_fleet",
    "rehearse_then_migrate",
    "rehearse_user",
    "remove_user",
    "repair",
    "resolve_users",
    "rollback_fleet_run",
    "rollback_user",
    "run_demo",
    "run_timeline",
    "runs_rows",
    "show_run",
    "status",
    "stop_run",
    "task_handler",
    "user_history",
    "verify",
    "warm_up",
]
