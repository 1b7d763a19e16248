"""What every ``byod`` command shares: the Typer apps, the consoles, the common options
and arguments, and how a command opens its workspace."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import typer.core
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text
from typer import _click as click
from typer._coercion import RuntimeParam

from byod.errors import InputError, SettingsError
from byod.extras import require
from byod.spec import DEFAULT_CONCURRENCY, FleetOptions

if TYPE_CHECKING:
    from byod.distributed import Broker
    from byod.settings import Settings
    from byod.workspace import Workspace


def _usage_name(argument: typer.core.TyperArgument) -> str:
    name = argument.display_name_raw
    return name if argument.required else f"[{name}]"


def _no_type(argument: typer.core.TyperArgument, ctx: object) -> str | None:
    return None


# Arguments shown as click shows them (``USER``, ``[USER]``), not as Typer 0.2x does
# (``{user}`` in the usage line, ``user <str>`` in the list); Typer builds its argument
# objects itself, so its class is where that is said.
typer.core.TyperArgument._usage_display_name = _usage_name  # type: ignore[method-assign, assignment]
typer.core.TyperArgument.display_type_rich = _no_type  # type: ignore[method-assign, assignment]


class _Text(RuntimeParam):
    """A plain ``str`` parameter, as Typer's own adapter coerces it (command-line values
    are already text), without building a pydantic adapter for it."""

    def _coerce_value(self, value: object, param: object, ctx: object) -> object:
        return value if isinstance(value, str) else str(value)


_typer_runtime_param = typer.core._TyperParameter.get_runtime_param
_typer_process_value = typer.core._TyperParameter.process_value


def _runtime_param(self: typer.core._TyperParameter) -> RuntimeParam:
    desc = self.type_descriptor
    info = desc.parameter_info
    if desc.annotation is str and info.parser is None:
        if self._runtime_param is None:
            self._runtime_param = _Text(parameter_info=info, annotation=str)
        return self._runtime_param
    return _typer_runtime_param(self)


def _process_value(self: typer.core._TyperParameter, ctx: click.Context, value: object) -> object:
    if value is None and self.nargs == 1 and not (self.multiple or self.required):
        # what Typer's coercion makes of an option not given (None), without building it
        return None if self.callback is None else self.callback(ctx, self, None)
    return _typer_process_value(self, ctx, value)


# Typer 0.29 coerces every parameter through a pydantic TypeAdapter it builds on first
# use, which imports pydantic (~70 ms) before any command runs. Text parameters and
# options not given never need one, so they skip it: `byod status` and its like start
# without pydantic; a number, a path or a choice given on the command line still goes
# through Typer's own adapter (its messages for bad values unchanged).
typer.core._TyperParameter.get_runtime_param = _runtime_param  # type: ignore[method-assign]
typer.core._TyperParameter.process_value = _process_value  # type: ignore[method-assign]

app = typer.Typer(
    help="Roll versioned schema migrations out to every user-owned database.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts hold [env: …] and [default: …] literally
)
users_app = typer.Typer(help="Manage app users.", no_args_is_help=True)
app.add_typer(users_app, name="users")
runs_app = typer.Typer(help="Fleet runs and their outcome.")
app.add_typer(runs_app, name="runs")
gate_app = typer.Typer(
    help="Fleet gates: a gated (contract) migration runs on no user until opened.",
    no_args_is_help=True,
)
app.add_typer(gate_app, name="gate")
convex_app = typer.Typer(help="Convex apps: add byod's module to an app.", no_args_is_help=True)
app.add_typer(convex_app, name="convex")

# Off a terminal (pipes, logs, CI) tables get room instead of 80 columns.
_WIDTH = None if sys.stdout.isatty() else 160
out = Console(highlight=False, soft_wrap=True, width=_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True)

#: Upper bounds for numbers from the command line: past them a value is a typo, and a
#: database would refuse it with an overflow instead of a clear message.
MAX_INT = 2**31 - 1
MAX_SECONDS = 7 * 24 * 3600.0

_USER_HELP = "A byod user id (ASCII digits only) or else a clerk id, matched exactly."
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url", metavar="URL", help="Control-plane URL [env: BYOD_DATABASE_URL]."
    ),
]
Migrations = Annotated[
    Path | None,
    typer.Option("--migrations", metavar="DIR", help="Migrations folder [env: BYOD_MIGRATIONS]."),
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
UserArg = Annotated[str, typer.Argument(metavar="USER", help=_USER_HELP, show_default=False)]
OptionalUser = Annotated[
    str | None, typer.Argument(metavar="USER", help=_USER_HELP, show_default=False)
]
Version = Annotated[
    int | None,
    typer.Option("--to", metavar="VERSION", min=0, max=MAX_INT, help="Target version."),
]
All = Annotated[bool, typer.Option("--all", help="Every eligible user.")]


def say(
    text: str, *, level: int = logging.INFO, error: str | None = None, plain: str | None = None
) -> None:
    """A message for the operator on stderr (Rich markup); with ``--log-format json``,
    a log record instead (``plain``, or the text without its markup), so stderr stays
    one JSON object per line."""
    from byod.logs import fields, json_on_stderr

    if json_on_stderr():
        plain = plain or Text.from_markup(text).plain
        logging.getLogger("byod.cli").log(level, "%s", plain, extra=fields(error=error))
        return
    err.print(text)


def workspace_for(
    database_url: str | None,
    migrations: Path | None,
    *,
    create_key: bool = False,
    allow_dirty: bool = False,
) -> Workspace:
    # imported here: `byod --help` never loads SQLAlchemy
    import dataclasses

    from byod.settings import Settings
    from byod.workspace import Workspace

    settings = Settings.load(database_url=database_url, migrations=migrations)
    if allow_dirty:
        policy = dataclasses.replace(settings.instance_policy, convex_allow_dirty=True)
        settings = dataclasses.replace(settings, instance_policy=policy)
    return Workspace(settings, create_key=create_key, broker=celery_broker)


def celery_broker(settings: Settings) -> Broker:
    """The task queue for distributed runs: the Celery adapter (imported only when a
    command needs it, so other commands never pay for importing Celery)."""
    require("celery", "a distributed run (BYOD_BROKER_URL)")
    from byod.taskqueue import CeleryBroker

    return CeleryBroker(settings)


AllowDirty = Annotated[
    bool,
    typer.Option(
        "--allow-dirty",
        help="Convex apps in git: run uncommitted migrations on the app folder as it is "
        "(local deployments only).",
    ),
]


def one_target(user: str | None, every: bool) -> str | None:
    if user is None and not every:
        raise InputError("give a USER or --all")
    if user is not None and every:
        raise InputError("give a USER or --all, not both")
    return user


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _print_version(asked: bool) -> None:
    if asked:
        from byod import __version__

        out.print(f"byod {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="Log every step to stderr.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print byod's version and exit.",
            is_eager=True,
            callback=_print_version,
        ),
    ] = False,
    log_file: Annotated[
        Path | None,
        typer.Option(
            "--log-file",
            metavar="FILE",
            help="Append every step's log here [env: BYOD_LOG_FILE].",
        ),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(
            "--log-format",
            metavar="text|json",
            help="json: one JSON object per event on stderr (and in --log-file), every "
            "step at INFO [env: BYOD_LOG_FORMAT; default: text].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Logging: off on stderr unless -v or BYOD_LOG_LEVEL (errors are printed anyway);
    a log file, when named, gets every step at INFO. ``--log-format json``: every event
    on stderr as JSON, and nothing else there."""
    from byod.logs import LOG_FORMATS, JsonFormatter, MaskSecrets

    chosen = (log_format or os.environ.get("BYOD_LOG_FORMAT") or "text").strip().lower()
    if chosen not in LOG_FORMATS:
        raise SettingsError(
            f"unknown log format {chosen!r}: use {' or '.join(LOG_FORMATS)} "
            "(--log-format or BYOD_LOG_FORMAT)"
        )
    as_json = chosen == "json"
    logger = logging.getLogger("byod")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    level_name = "INFO" if verbose else os.environ.get("BYOD_LOG_LEVEL", "").strip().upper()
    if level_name and level_name not in _LEVELS:
        raise SettingsError(
            f"unknown log level {level_name.lower()!r} in BYOD_LOG_LEVEL: use one of "
            f"{', '.join(name.lower() for name in _LEVELS)}"
        )
    if level_name == "DEBUG":
        logger.setLevel(logging.DEBUG)
    if as_json:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(JsonFormatter())
        stream.setLevel(getattr(logging, level_name or "INFO", logging.INFO))
        logger.addHandler(stream)
    elif level_name:
        handler = RichHandler(console=err, show_path=False, markup=False, rich_tracebacks=False)
        handler.setLevel(getattr(logging, level_name, logging.INFO))
        logger.addHandler(handler)
    file_name = log_file or os.environ.get("BYOD_LOG_FILE")
    if file_name:
        try:
            file_handler = logging.FileHandler(file_name)
        except OSError as exc:
            raise SettingsError(
                f"cannot write the log file {file_name}: {exc.strerror or exc}"
            ) from exc
        file_handler.setFormatter(
            JsonFormatter()
            if as_json
            else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s")
        )
        logger.addHandler(file_handler)
    for one in logger.handlers:
        one.addFilter(MaskSecrets())
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())


DEFAULTS = FleetOptions()
Concurrency = Annotated[
    int | None,
    typer.Option(
        "--concurrency",
        metavar="N",
        min=1,
        max=10_000,
        help=f"Users migrated at once (fleet runs) [default: {DEFAULT_CONCURRENCY}].",
        show_default=False,
    ),
]
Retries = Annotated[
    int | None,
    typer.Option(
        "--retries",
        metavar="N",
        min=0,
        max=100,
        help=f"Retries of a transient failure, with backoff [default: {DEFAULTS.retries}; "
        "0 for one USER].",
        show_default=False,
    ),
]
Timeout = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        min=0.1,
        max=MAX_SECONDS,
        help="Seconds allowed per instance transaction (a step, a backfill batch) and per "
        "connect; one USER too.",
    ),
]
LeaseSeconds = Annotated[
    float | None,
    typer.Option(
        "--lease-seconds",
        metavar="SECONDS",
        min=1,
        max=MAX_SECONDS,
        help=f"Lease length; renewed while working [default: {DEFAULTS.lease_seconds:g}].",
        show_default=False,
    ),
]
Canary = Annotated[
    int | None,
    typer.Option(
        "--canary",
        metavar="N",
        min=0,
        max=MAX_INT,
        help="Migrate N users first; halt if any fails (fleet runs).",
    ),
]
Processes = Annotated[
    int | None,
    typer.Option(
        "--processes",
        metavar="N",
        min=1,
        max=256,
        help="Worker processes (one user each) instead of threads (fleet runs).",
    ),
]
MaxFailureRatio = Annotated[
    float | None,
    typer.Option(
        "--max-failure-ratio",
        metavar="RATIO",
        min=0,
        max=1,
        help="Halt once failed/done passes RATIO (fleet runs).",
    ),
]


def fleet_options(**given: float | None) -> FleetOptions:
    """FleetOptions from the flags given (None: not given, the default applies)."""
    return FleetOptions(**{name: value for name, value in given.items() if value is not None})  # type: ignore[arg-type]


def single_options(
    retries: int | None,
    timeout: float | None,
    lease_seconds: float | None,
    **batching: float | None,
) -> FleetOptions:
    """One USER: no retries unless asked (an operator is watching), the rest as a fleet."""
    return fleet_options(
        retries=0 if retries is None else retries,
        timeout=timeout,
        lease_seconds=lease_seconds,
        **batching,
    )


BatchSize = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        metavar="ROWS",
        min=1,
        max=1_000_000,
        help="Rows per backfill batch [default: each backfill's own].",
    ),
]
BatchPause = Annotated[
    float | None,
    typer.Option(
        "--batch-pause",
        metavar="SECONDS",
        min=0,
        max=3600,
        help="Pause between backfill batches on one instance (a throttle).",
    ),
]


def refuse_fleet_only(**given: object) -> None:
    """One USER is not a fleet run: its fleet-only flags are refused, never ignored."""
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is not None]
    if named:
        raise InputError(
            f"{', '.join(named)} {'goes' if len(named) == 1 else 'go'} with a fleet run "
            "(--all, --users or --run); one USER takes --to, --timeout, --retries and "
            "--lease-seconds"
        )


def user_list(value: str | None) -> tuple[str, ...] | None:
    """``--users``: comma-separated ids/clerk ids, or a file with one per line."""
    if value is None:
        return None
    path = Path(value)
    try:
        text = path.read_text() if path.is_file() else value.replace(",", "\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--users: cannot read {value}: {exc}") from exc
    refs = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not refs:
        raise InputError("--users names no user")
    return refs
