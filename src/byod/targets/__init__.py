"""Targets: adapters that reach one kind of user instance."""

from byod.targets.base import StampEntry, StepBody, Target
from byod.targets.sql import SqlTarget, open_target

__all__ = ["SqlTarget", "StampEntry", "StepBody", "Target", "open_target"]
