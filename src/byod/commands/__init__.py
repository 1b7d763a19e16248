"""The commands, as plain functions of a :class:`~byod.workspace.Workspace` (Alembic's
``command`` style).

Each opens what it needs, calls the core (runner, fleet, control plane) and returns plain
data; every front end (the command line, the HTTP service and its dashboard, the task
queue's worker) calls these and only renders what they return.
"""

from byod.commands.demo import DemoResult, run_demo
from byod.commands.reports import (
    InstanceView,
    RunDetails,
    VerifyReport,
    caller,
    get_run,
    history_of,
    instance,
    instance_busy,
    list_runs,
    list_users,
    pending,
    pending_migrations,
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
    init,
    new_migration,
)

__all__ = [
    "DemoResult",
    "InitResult",
    "InstanceView",
    "RunDetails",
    "UserPlan",
    "VerifyReport",
    "add_user",
    "caller",
    "check_service",
    "check_worker",
    "connect",
    "follow",
    "get_run",
    "history_of",
    "init",
    "instance",
    "instance_busy",
    "list_runs",
    "list_users",
    "migrate_distributed",
    "migrate_fleet",
    "migrate_user",
    "new_migration",
    "pending",
    "pending_migrations",
    "plan",
    "repair",
    "resolve_users",
    "rollback_fleet_run",
    "rollback_user",
    "run_demo",
    "runs_rows",
    "show_run",
    "status",
    "stop_run",
    "task_handler",
    "user_history",
    "verify",
    "warm_up",
]
