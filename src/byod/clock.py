"""byod's one clock: every timestamp it stores is UTC, without tzinfo; every timestamp it
shows a machine (HTTP API, ``--json``, JSON logs) is RFC 3339 in UTC, ``…Z``."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["as_utc", "rfc3339", "utcnow"]


def utcnow() -> datetime:
    """Now, in UTC, without tzinfo: how every timestamp is stored."""
    return datetime.now(UTC).replace(tzinfo=None)


def as_utc(moment: datetime) -> datetime:
    """A stored (naive UTC) or any aware moment as an aware UTC one."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def rfc3339(moment: datetime, timespec: str = "microseconds") -> str:
    """``moment`` as RFC 3339 in UTC with its offset written ``Z``
    (``2026-11-28T23:10:46.485731Z``)."""
    return as_utc(moment).isoformat(timespec=timespec).replace("+00:00", "Z")
