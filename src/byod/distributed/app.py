"""The Celery app for ``celery -A byod.distributed.app worker``, configured from the
``BYOD_*`` environment (``byod worker`` does the same with checks first)."""

from __future__ import annotations

from byod.distributed.celery_app import make_app
from byod.settings import Settings

__all__ = ["app"]

app = make_app(Settings.load())
