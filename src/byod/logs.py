"""Log records as one JSON object per line (``--log-format json``), for operators' log
pipelines; and the fields byod's own records carry for it.

A record's fields come from ``extra=`` (see :func:`fields`); the message itself is the
plain-text line, already scrubbed of secrets by whoever wrote it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from byod.clock import rfc3339
from byod.redact import mask

__all__ = [
    "FIELDS",
    "LOG_FORMATS",
    "JsonFormatter",
    "MaskSecrets",
    "fields",
    "json_on_stderr",
    "libraries_log_json",
]

#: The event fields a record may carry, in the order they are written.
FIELDS = (
    "run_id",
    "user_id",
    "clerk_id",
    "migration",
    "direction",
    "attempt",
    "duration_ms",
    "outcome",
    "error",
)
LOG_FORMATS = ("text", "json")


def fields(**values: object) -> dict[str, object]:
    """``extra=`` for a log call: the event fields given, Nones left out."""
    unknown = set(values) - set(FIELDS)
    assert not unknown, unknown
    return {name: value for name, value in values.items() if value is not None}


class MaskSecrets(logging.Filter):
    """A handler's last guard: every secret byod knows masked out of each record's
    message (see :mod:`byod.redact`), whoever wrote it (a library's record too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (RFC 3339, UTC), ``level``, ``logger``,
    ``message`` and whichever of :data:`FIELDS` the record carries; an exception's
    class as ``error`` (never its traceback, which may hold values)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = rfc3339(datetime.fromtimestamp(record.created, UTC), "milliseconds")
        event: dict[str, object] = {
            "ts": stamp,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                event[name] = value
        if record.exc_info and record.exc_info[0] is not None and "error" not in event:
            event["error"] = record.exc_info[0].__name__
        return json.dumps(event, ensure_ascii=False, default=str)


def _json_stderr_handler() -> logging.Handler | None:
    return next(
        (
            handler
            for handler in logging.getLogger("byod").handlers
            if isinstance(handler.formatter, JsonFormatter)
            and getattr(handler, "stream", None) is sys.stderr
        ),
        None,
    )


def json_on_stderr() -> bool:
    """Whether byod's log goes to stderr as JSON (then stderr carries nothing else)."""
    return _json_stderr_handler() is not None


def libraries_log_json(levels: dict[str, int]) -> bool:
    """With byod's log on stderr as JSON, send these loggers' records (a library's:
    uvicorn's, Celery's, ``""`` for the root) through the same handler at these levels,
    so stderr stays one JSON object per line; True if it did (False in text mode)."""
    handler = _json_stderr_handler()
    if handler is None:
        return False
    for name, level in levels.items():
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(level)
    return True
