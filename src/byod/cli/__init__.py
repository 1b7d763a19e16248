"""The ``byod`` command line: parse, call one function in ``commands``, render.

Exit status: 0 all good, 1 something failed (the output says what), 2 bad usage or input.
Errors are caught once, in :func:`main`. The commands live in :mod:`.manage`,
:mod:`.runs`, :mod:`.reports` and :mod:`.gates`; what they share in :mod:`.base`; tables and JSON in
:mod:`.render`; progress bars and summaries in :mod:`.progress`.
"""

from __future__ import annotations

import sys

import typer
import typer.main

from byod.cli import gates, manage, reports, runs  # noqa: F401 - each registers its commands
from byod.cli.base import app, celery_broker, err
from byod.cli.progress import print_error
from byod.errors import ByodError
from byod.extras import missing_extra

__all__ = ["app", "celery_broker", "main"]


def main() -> None:
    """Entry point of the ``byod`` script: runs the app, turns errors into exit codes."""
    try:
        _app_for(sys.argv[1:])()
    except ByodError as error:
        print_error(err, error)
        sys.exit(error.exit_code)
    except ImportError as exc:  # an extra's package a command imported without asking
        missing = missing_extra(exc, f"byod {sys.argv[1] if len(sys.argv) > 1 else ''}".strip())
        if missing is None:
            raise
        print_error(err, missing)
        sys.exit(missing.exit_code)


def _app_for(args: list[str]) -> typer.Typer:
    """The app with only the command the command line names first: Typer builds every
    registered command's options before it runs one (~30 ms of a run's start-up). The
    whole app for help, an unknown name or no name (its messages list every command)."""
    name = args[0] if args else ""
    commands = [
        c
        for c in app.registered_commands
        if (c.name or typer.main.get_command_name(getattr(c.callback, "__name__", ""))) == name
    ]
    groups = [g for g in app.registered_groups if g.name == name]
    if name.startswith("-") or len(commands) + len(groups) != 1:
        return app
    slim = typer.Typer(
        help=app.info.help,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        rich_markup_mode=None,
    )
    slim.registered_commands = commands
    slim.registered_groups = groups
    slim.registered_callback = app.registered_callback  # the global options, and a group
    return slim
