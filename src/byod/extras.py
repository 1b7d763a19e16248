"""Which optional packages byod's features need (the extras of ``pip install "byod[...]"``)
and the error that names the one to install.

The core (the library, the command line, SQLite and Convex) needs no extra. A feature
that does imports its packages only when it runs: :func:`needs` turns the import's
failure into a :class:`~byod.errors.MissingExtraError`, :func:`require` checks before
anything is started or stored, and the command line's edge maps any import of an
extra's package that slipped through the same way, so a user never meets an ImportError.
"""

from __future__ import annotations

import importlib.util
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING

from byod.errors import MissingExtraError

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["EXTRAS", "missing_extra", "needs", "require"]

#: Each extra and the top-level modules it brings (the first: the one to look for)
EXTRAS: dict[str, tuple[str, ...]] = {
    "postgres": ("psycopg",),
    "mysql": ("pymysql",),
    "serve": ("fastapi", "uvicorn", "jwt", "starlette"),
    "celery": ("celery", "kombu", "redis"),
}
_EXTRA_OF = {module: extra for extra, modules in EXTRAS.items() for module in modules}


def missing_extra(exc: ImportError, feature: str) -> MissingExtraError | None:
    """The error naming the extra whose package ``exc`` failed to import, or None when
    the missing module is no extra's (a real bug, left to surface as it is)."""
    module = (exc.name or "").partition(".")[0]
    extra = _EXTRA_OF.get(module)
    return None if extra is None else MissingExtraError(extra, module, feature)


@contextmanager
def needs(feature: str) -> Iterator[None]:
    """Run the block; an import of an extra's package that fails in it raises
    :class:`MissingExtraError` for ``feature`` (e.g. ``"a PostgreSQL instance"``)."""
    try:
        yield
    except ImportError as exc:
        error = missing_extra(exc, feature)
        if error is None:
            raise
        raise error from None


def require(extra: str, feature: str) -> None:
    """:class:`MissingExtraError` unless every package of ``extra`` is installed (checked
    without importing them)."""
    for module in EXTRAS[extra]:
        if module in sys.modules:  # imported already (find_spec refuses a module whose
            continue  # __spec__ is None, as a package's lazy stand-ins leave it)
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(extra, module, feature)
