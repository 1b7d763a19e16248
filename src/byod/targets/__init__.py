"""Targets: adapters that reach one kind of user instance.

:class:`SqlTarget` and :func:`open_target` load with their module on first use: a
command that never reaches an instance (``byod status``) does not pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from byod.targets.base import StampEntry, StepBody, Target

if TYPE_CHECKING:
    from byod.targets.sql import SqlTarget, open_target

__all__ = ["SqlTarget", "StampEntry", "StepBody", "Target", "open_target"]


def __getattr__(name: str) -> Any:
    if name in ("SqlTarget", "open_target"):
        from byod.targets import sql

        return getattr(sql, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
