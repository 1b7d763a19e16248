"""The Celery app for ``celery -A byod.taskqueue.app worker``, configured from the
``BYOD_*`` environment (``byod worker`` does the same with checks first)."""

from __future__ import annotations

from byod.settings import Settings
from byod.taskqueue.celery_app import make_app

__all__ = ["app"]

app = make_app(Settings.load())
