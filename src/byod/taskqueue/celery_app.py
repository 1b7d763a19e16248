"""The Celery adapter: byod's task on a Celery app, sending tasks, running a worker.

The only part of byod that imports Celery.

Tasks are acknowledged late and handed back to the broker when their worker is lost
(``task_acks_late``, ``task_reject_on_worker_lost``); each worker takes one task at a
time (``worker_prefetch_multiplier = 1``). Everything a task does is in
:class:`~byod.distributed.worker.TaskHandler`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from celery import Celery, Task, signals
from celery.signals import worker_process_init, worker_process_shutdown
from celery.worker.request import Request
from kombu.exceptions import OperationalError
from kombu.transport import virtual

from byod import commands
from byod.distributed.dispatch import Publisher, TaskMessage
from byod.distributed.worker import TaskHandler
from byod.errors import BrokerError, ControlPlaneError, SettingsError
from byod.settings import Settings
from byod.workspace import Workspace

__all__ = [
    "TASK_NAME",
    "USER_TASK_NAME",
    "CeleryBroker",
    "check_broker",
    "free_slot_kept_by_broker",
    "make_app",
    "publisher",
    "run_worker",
    "safe_broker_url",
    "serve_worker",
]

log = logging.getLogger("byod.taskqueue")

TASK_NAME = "byod.migrate_page"
#: The task of byod before tasks carried pages (one user each): still run, so messages
#: queued by an older byod are not lost in an upgrade.
USER_TASK_NAME = "byod.migrate_user"
_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp")

# One handler per worker process, built when it starts (after the fork).
_handlers: dict[int, TaskHandler] = {}
_apps: list[Celery] = []


def safe_broker_url(url: str) -> str:
    """The broker URL with its password hidden."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    # rebuilt by structure, never by replacing the password's text (a one-character
    # password would garble the host)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username or ''}:***@{host}"
    return parts._replace(netloc=netloc).geturl()


def make_app(settings: Settings) -> Celery:
    """A Celery app on the configured broker with byod's task registered."""
    url = settings.broker_url
    if not url:
        raise SettingsError(
            "no task-queue broker: set BYOD_BROKER_URL (redis://host:6379/0 or "
            "amqp://user:password@host:5672//)"
        )
    if urlsplit(url).scheme not in _SCHEMES:
        raise SettingsError(
            f"BYOD_BROKER_URL {safe_broker_url(url)} is neither redis:// nor amqp://"
        )
    app = Celery("byod", broker=url, set_as_current=False)
    conf: dict[str, Any] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.default_queue,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": 3,
        "worker_hijack_root_logger": False,
        "worker_enable_remote_control": False,
    }
    if urlsplit(url).scheme.startswith("redis"):
        timeout = settings.broker_visibility_timeout
        conf["broker_transport_options"] = {
            "visibility_timeout": timeout,
            "unacked_restore_interval": max(1, min(10, int(timeout / 2))),
            "unacked_restore_throttle": 1,
        }
    app.conf.update(conf)
    app.byod_settings = settings  # what each worker process builds its runner from
    _apps.append(app)
    app.task(name=TASK_NAME, bind=True, max_retries=None, Request=_BrokerLossSafeRequest)(
        _migrate_page
    )
    app.task(name=USER_TASK_NAME, bind=True, max_retries=None, Request=_BrokerLossSafeRequest)(
        _migrate_user
    )
    return app


class _BrokerLossSafeRequest(Request):  # type: ignore[misc]
    """A task request whose worker keeps taking tasks when the broker could not take its
    acknowledgement.

    On Redis, kombu counts a message against the worker's prefetch until the broker
    confirms its acknowledgement; an acknowledgement sent while Redis was down or
    restarting (logged by kombu as "Couldn't ack") never is, and a worker whose every slot
    is so held takes no task again (found by ``bench/soak.py --seed 1 --faults
    broker_restart``). Here the slot is freed in the worker: the message itself stays
    where the broker has it (lost with a restarted Redis, else handed out again after its
    visibility timeout); byod's tasks are safe to run twice and the run's watcher sends
    again what is lost.
    """

    def acknowledge(self) -> None:
        try:
            super().acknowledge()
        finally:  # kombu re-raises a BrokenPipeError
            self._free_a_slot_the_broker_kept()

    def reject(self, requeue: bool = False) -> None:
        try:
            super().reject(requeue=requeue)
        finally:
            self._free_a_slot_the_broker_kept()

    def _free_a_slot_the_broker_kept(self) -> None:
        if free_slot_kept_by_broker(self._message):
            log.warning(
                "the broker did not take the acknowledgement of task %s (%s); the worker "
                "takes tasks on, and the task may be delivered again",
                self.id,
                self.name,
            )


def free_slot_kept_by_broker(message: Any) -> bool:
    """Free the worker's prefetch slot held by ``message`` when the broker did not take
    its acknowledgement (kombu's virtual transports, Redis among them, count a message
    until the broker confirms it); whether one was freed. The worker's count only: the
    message stays where the broker has it."""
    qos = getattr(message.channel, "qos", None)
    if message.acknowledged or not isinstance(qos, virtual.QoS):
        return False  # done, or a broker (AMQP) whose channel dies and is made anew
    tag = message.delivery_tag
    if tag not in qos._delivered or tag in qos._dirty:
        return False
    virtual.QoS.ack(qos, tag)  # type: ignore[no-untyped-call]  # the base: no broker call
    return True


def _warm_up(**_: object) -> None:
    """Each pool process builds its runner and opens a control-plane connection when it
    starts, so its first task does not pay for it (nor for importing Alembic)."""
    if not _apps:
        return
    try:
        commands.warm_up(_handler(_apps[-1]))
    except Exception as exc:  # the first task reports any real problem
        log.warning("worker process warm-up failed: %s", exc)


worker_process_init.connect(_warm_up, weak=False)


def _metrics_gone(**_: object) -> None:
    """A pool process that ends takes its in-flight gauge out of the worker's metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


worker_process_shutdown.connect(_metrics_gone, weak=False)


def _migrate_page(task: Task, run_id: str, user_ids: list[int]) -> None:
    """The task: a page of one distributed run's users. While the control plane is out
    of reach the task waits (retried with backoff) instead of being dropped."""
    try:
        retry_in = _handler(task.app).handle(run_id, [int(uid) for uid in user_ids])
    except ControlPlaneError as exc:
        retry_in = min(60.0, 2.0 ** min(task.request.retries, 6))
        log.warning(
            "run %s, %d users: %s; trying again in %.0fs", run_id, len(user_ids), exc, retry_in
        )
    if retry_in is not None:
        raise task.retry(countdown=retry_in)


def _migrate_user(task: Task, run_id: str, user_id: int) -> None:
    """An older byod's task: one user (see :data:`USER_TASK_NAME`)."""
    _migrate_page(task, run_id, [user_id])


def _handler(app: Celery) -> TaskHandler:
    pid = os.getpid()
    handler = _handlers.get(pid)
    if handler is None:
        handler = commands.task_handler(Workspace(app.byod_settings), publisher(app))
        _handlers[pid] = handler
    return handler


def publisher(app: Celery) -> Publisher:
    """Sends task messages through ``app``'s broker, each to its users' queue."""

    def publish(messages: Sequence[TaskMessage]) -> None:
        try:
            with app.producer_or_acquire() as producer:
                for message in messages:
                    app.send_task(
                        TASK_NAME,
                        args=[message.run_id, list(message.user_ids)],
                        queue=message.queue or app.conf.task_default_queue,
                        producer=producer,
                    )
        except (OperationalError, OSError) as exc:
            raise _broker_error(app, exc) from exc

    return publish


def check_broker(app: Celery) -> None:
    """Raise :class:`BrokerError` unless the broker answers (before anything starts)."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
    except (OperationalError, OSError) as exc:
        raise _broker_error(app, exc) from exc


def _broker_error(app: Celery, exc: Exception) -> BrokerError:
    where = safe_broker_url(str(app.conf.broker_url))
    return BrokerError(f"cannot reach the task-queue broker at {where} ({type(exc).__name__})")


def run_worker(
    app: Celery, *, concurrency: int, queues: Sequence[str], loglevel: str = "INFO"
) -> None:
    """Run a Celery worker for byod's tasks in this process until it is stopped (in JSON
    log mode, Celery's own records are JSON on stderr too, and its banner is left out)."""
    quiet = _celery_logs_json()
    app.worker_main(
        [
            *(["--quiet"] if quiet else []),
            "worker",
            f"--concurrency={concurrency}",
            f"--queues={','.join(queues)}",
            f"--loglevel={loglevel}",
            f"--hostname=byod-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
            # byod uses no worker events; a heartbeat sent while the broker is down would
            # hold the worker's event loop in its retries
            "--without-heartbeat",
        ]
    )


def _celery_logs_json() -> bool:
    """In JSON log mode, Celery sets up no logging of its own: its records (and every
    library's, through the root logger) go through byod's JSON handler instead."""
    from byod.logs import json_on_stderr, libraries_log_json

    if not json_on_stderr():
        return False
    logging.captureWarnings(True)  # e.g. Celery's warning about running as root
    libraries_log_json({"py.warnings": logging.WARNING})

    def as_json(loglevel: int = logging.INFO, **_: object) -> None:
        libraries_log_json({"": loglevel, "alembic": logging.WARNING})

    signals.setup_logging.connect(as_json, weak=False)
    return True


class CeleryBroker:
    """The task queue as the core sees it (:class:`~byod.distributed.Broker`), on Celery."""

    def __init__(self, settings: Settings) -> None:
        self.app = make_app(settings)  # no broker configured: a SettingsError
        self.publish = publisher(self.app)

    def check(self) -> None:
        """Raise :class:`BrokerError` unless the broker answers."""
        check_broker(self.app)


def serve_worker(ws: Workspace, *, concurrency: int, queues: Sequence[str], loglevel: str) -> None:
    """``byod worker``: check everything a task needs (control plane, migrations, key,
    broker), then run a Celery worker for byod's tasks here until it is stopped."""
    broker = CeleryBroker(ws.settings)
    commands.check_worker(ws)
    broker.check()
    run_worker(
        broker.app,
        concurrency=concurrency,
        queues=list(queues) or [ws.settings.default_queue],
        loglevel=loglevel,
    )
