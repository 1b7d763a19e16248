"""Fleet runs beyond one machine: the per-user step as tasks on a task queue.

This package knows nothing of Celery: it speaks to a :class:`~.dispatch.Broker`, which
the adapter (:mod:`byod.taskqueue`) supplies. The control plane must be PostgreSQL.
"""

from byod.distributed.dispatch import (
    Broker,
    Dispatcher,
    Publisher,
    TaskMessage,
    require_server_control_plane,
)
from byod.distributed.run import RunProgress, follow_run, start_distributed, summary_of
from byod.distributed.worker import TaskHandler

__all__ = [
    "Broker",
    "Dispatcher",
    "Publisher",
    "RunProgress",
    "TaskHandler",
    "TaskMessage",
    "follow_run",
    "require_server_control_plane",
    "start_distributed",
    "summary_of",
]
