"""The ``byod`` command line: parse, call one function in ``commands``, render.

Exit status: 0 all good, 1 something failed (the output says what), 2 bad usage or input.
Errors are caught once, in :func:`main`. The commands live in :mod:`.manage`,
:mod:`.runs`, :mod:`.reports` and :mod:`.gates`; what they share in :mod:`.base`; tables and JSON in
:mod:`.render`; progress bars and summaries in :mod:`.progress`.
"""

from __future__ import annotations

import sys

from byod.cli import gates, manage, reports, runs  # noqa: F401 - each registers its commands
from byod.cli.base import app, celery_broker, err
from byod.cli.progress import print_error
from byod.errors import ByodError

__all__ = ["app", "celery_broker", "main"]


def main() -> None:
    """Entry point of the ``byod`` script: runs the app, turns errors into exit codes."""
    try:
        app()
    except ByodError as error:
        print_error(err, error)
        sys.exit(error.exit_code)
