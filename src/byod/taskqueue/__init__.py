"""The task queue's adapter: distributed runs on Celery (Redis or RabbitMQ).

A front end, like the command line and the HTTP service: it hands the core a
:class:`~byod.distributed.Broker` and runs the worker entry point. The only package
that imports Celery.
"""

from byod.taskqueue.celery_app import CeleryBroker, make_app, publisher, serve_worker

__all__ = ["CeleryBroker", "make_app", "publisher", "serve_worker"]
