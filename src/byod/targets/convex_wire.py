"""What byod's Convex client puts on and reads off the wire besides the call itself: the
``Convex-Client`` header's version, function paths and arguments as Convex encodes them,
``Retry-After`` as a wait, and a function's own error."""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, NoReturn

from byod.errors import MigrationFailedError
from byod.targets.convex_values import ConvexValueError, Value, encode

__all__ = [
    "CLIENT_VERSION",
    "FunctionError",
    "checked_path",
    "encoded_args",
    "no_constant",
    "retry_after",
]

_FUNCTION_PATH = re.compile(r"[!-~]{1,1024}")


def _semver() -> str:
    try:
        found = re.match(r"[0-9]+\.[0-9]+\.[0-9]+", metadata.version("byod"))
    except metadata.PackageNotFoundError:
        found = None
    return found.group(0) if found else "0.0.0"


#: The ``Convex-Client`` header byod sends.
CLIENT_VERSION = f"byod-{_semver()}"


def retry_after(header: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (seconds or an HTTP date), or None."""
    if header is None:
        return None
    text = header.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class FunctionError(MigrationFailedError):
    """A Convex function threw (HTTP 560): its message, and its ``ConvexError`` data
    (``data``; None when it threw a plain ``Error``)."""

    def __init__(self, message: str, *, data: Value = None) -> None:
        super().__init__(message)
        self.data = data

    @property
    def code(self) -> str | None:
        """The ``code`` of a ``ConvexError`` whose data is an object that has one."""
        if isinstance(self.data, dict) and isinstance(self.data.get("code"), str):
            return str(self.data["code"])
        return None


def no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def checked_path(path: str, what: str) -> str:
    if not isinstance(path, str) or not _FUNCTION_PATH.fullmatch(path):
        raise ValueError(f"a Convex {what} must be 1 to 1024 printable ASCII characters")
    return path


def encoded_args(args: Mapping[str, Value] | None) -> Any:
    if args is None:
        return {}
    if not isinstance(args, Mapping):
        raise ConvexValueError(
            f"the arguments of a Convex function must be a dict, not {type(args).__name__}"
        )
    return encode(dict(args))
