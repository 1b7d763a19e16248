"""Notification hooks: tell the app when a user's instance needs the user's attention.

The app configures a callable (``BYOD_NOTIFY_HOOK=package.module:function``, or passed to
the runner); it gets a :class:`Notice`. The default logs it. A hook that raises is logged
and otherwise ignored: a notification never breaks a run.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from byod.errors import SettingsError
from byod.logs import fields

__all__ = ["Notice", "Notifier", "load_notifier", "log_notice", "safe_notify"]

log = logging.getLogger("byod.notify")


@dataclass(frozen=True)
class Notice:
    """Something about a user's instance the user should hear of (``kind``: ``unreachable``)."""

    kind: str
    user_id: int
    clerk_id: str
    message: str


Notifier = Callable[[Notice], None]


def log_notice(notice: Notice) -> None:
    """The default hook: a warning in the log."""
    log.warning(
        "notify user %s (%s): %s: %s",
        notice.user_id,
        notice.clerk_id,
        notice.kind,
        notice.message,
        extra=fields(user_id=notice.user_id, clerk_id=notice.clerk_id, outcome=notice.kind),
    )


def safe_notify(notifier: Notifier, notice: Notice) -> None:
    """Call the hook; log, never raise, if it fails."""
    try:
        notifier(notice)
    except Exception as exc:
        log.error("notification hook failed for user %s: %s", notice.user_id, type(exc).__name__)


def load_notifier(spec: str | None) -> Notifier:
    """The hook named ``module:function``, or the logging default when ``spec`` is empty."""
    if not spec:
        return log_notice
    module_name, _, attribute = spec.partition(":")
    try:
        hook = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise SettingsError(f"BYOD_NOTIFY_HOOK {spec!r} does not name module:function") from exc
    if not callable(hook):
        raise SettingsError(f"BYOD_NOTIFY_HOOK {spec!r} is not callable")
    return hook  # type: ignore[no-any-return]
