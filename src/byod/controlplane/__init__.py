"""The control plane: the app's own database of users, BYOD configs and the ledger."""

from byod.controlplane._bulk import ExistingUser, NewConfig
from byod.controlplane.checksums import (
    record_acceptance,
    record_applied_checksum,
    refuse_drift_up_front,
)
from byod.controlplane.directory import Config, Directory, User
from byod.controlplane.ledger import Ledger, LedgerRow
from byod.controlplane.queries import (
    FailureRow,
    FleetStatus,
    OutdatedConfig,
    count_ahead,
    count_outdated_by_key,
    fleet_status,
    history,
    iter_outdated,
    outdated_query,
)
from byod.controlplane.run_records import (
    Claim,
    DispatchRow,
    FinishedTask,
    MovedUser,
    RunRecord,
    TaskEnd,
)
from byod.controlplane.runs import RunStore, local_user
from byod.controlplane.schema import create_tables, open_engine, require_tables
from byod.controlplane.tasks import TaskStore

__all__ = [
    "Claim",
    "Config",
    "Directory",
    "DispatchRow",
    "ExistingUser",
    "FailureRow",
    "FinishedTask",
    "FleetStatus",
    "Ledger",
    "LedgerRow",
    "MovedUser",
    "NewConfig",
    "OutdatedConfig",
    "RunRecord",
    "RunStore",
    "TaskEnd",
    "TaskStore",
    "User",
    "count_ahead",
    "count_outdated_by_key",
    "create_tables",
    "fleet_status",
    "history",
    "iter_outdated",
    "local_user",
    "open_engine",
    "outdated_query",
    "record_acceptance",
    "record_applied_checksum",
    "refuse_drift_up_front",
    "require_tables",
]
