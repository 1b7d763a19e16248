"""Fleet runs beyond one machine: the per-user step as tasks on a Celery task queue.

The core (:mod:`.dispatch`, :mod:`.run`, :mod:`.worker`) knows nothing of Celery;
:mod:`.celery_app` is the adapter. The control plane must be PostgreSQL.
"""

from byod.distributed.dispatch import Dispatcher, TaskMessage, require_server_control_plane
from byod.distributed.run import RunProgress, follow_run, start_distributed, summary_of
from byod.distributed.worker import TaskHandler

__all__ = [
    "Dispatcher",
    "RunProgress",
    "TaskHandler",
    "TaskMessage",
    "follow_run",
    "require_server_control_plane",
    "start_distributed",
    "summary_of",
]
