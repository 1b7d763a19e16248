"""Migrations: the definition, loading a folder, validation, checksums and plans.

A migrations folder holds files named ``NNN_slug.py``; each defines
``migration = Migration(...)``. Loading validates the whole folder before anything
connects anywhere, and plans are plain frozen data that ``plan`` and ``migrate`` share.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from byod.checksums import bytes_checksum, source_checksum
from byod.errors import MigrationFailedError, PlanError, RegistryError

if TYPE_CHECKING:
    from alembic.operations import Operations
    from sqlalchemy import Connection, Engine

__all__ = [
    "Backfill",
    "BatchFn",
    "Direction",
    "FunctionCalls",
    "Kind",
    "Migration",
    "MigrationContext",
    "Plan",
    "Registry",
    "Step",
]

Direction = Literal["up", "down"]
_FILE_NAME = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.py$")


#: The kinds of instance a migration can run on (``ctx.kind``).
Kind = Literal["sqlite", "postgresql", "mysql", "mariadb", "convex"]


class FunctionCalls(Protocol):
    """A Convex deployment's functions, as a migration calls them (``ctx.convex``): each
    call is one request, bounded by the run's ``--timeout``; arguments and results are
    Convex values (``int`` for int64, ``float`` for numbers, ``bytes``, lists, dicts)."""

    def query(self, path: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run query ``path`` (``"module:name"``; internal ones too) and return its result;
        a ``path`` that is not a query fails the step (nothing runs)."""
        ...

    def mutation(self, path: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run mutation ``path`` (one Convex transaction) and return its result; a
        ``path`` that is not a mutation fails the step (nothing runs)."""
        ...

    def action(self, path: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run action ``path`` and return its result; a ``path`` that is not an action
        fails the step (nothing runs)."""
        ...


class MigrationContext:
    """What a migration's ``up``/``down`` (and a backfill's ``apply``) gets.

    ``kind`` is the instance's kind (``"sqlite"``, ``"postgresql"``, ``"mysql"``,
    ``"mariadb"`` or ``"convex"``). On a SQL instance, ``conn`` is the connection inside
    the migration's own transaction and ``op`` Alembic's ``Operations`` bound to it
    (portable DDL, built the first time it is used); on a Convex deployment,
    ``convex`` calls the user's deployment's functions. Using the other kind's attribute
    fails the step with a message saying which to use. ``main`` is the app's
    control-plane engine, for reads; ``app`` the app's own Convex deployment, where one is
    configured; ``log`` a logger that names the user and migration.
    """

    def __init__(
        self,
        *,
        kind: Kind,
        main: Engine,
        user_id: int,
        clerk_id: str,
        log: logging.LoggerAdapter[logging.Logger],
        conn: Connection | None = None,
        convex: FunctionCalls | None = None,
        app: FunctionCalls | None = None,
    ) -> None:
        self.kind = kind
        self._app = app
        self.main = main
        self.user_id = user_id
        self.clerk_id = clerk_id
        self.log = log
        self._conn = conn
        self._convex = convex
        self._op: Operations | None = None

    @property
    def conn(self) -> Connection:
        """The SQL instance's connection, inside the step's transaction."""
        if self._conn is None:
            raise MigrationFailedError(
                f"ctx.conn: this instance is a {self.kind} deployment, not a SQL database: "
                "call its functions with ctx.convex.query/mutation/action"
            )
        return self._conn

    @property
    def op(self) -> Operations:
        """Alembic's ``Operations`` on :attr:`conn` (SQL instances)."""
        if self._op is None:
            # imported here: a run whose migrations never use ctx.op never pays for it
            from alembic.operations import Operations
            from alembic.runtime.migration import MigrationContext as AlembicContext

            self._op = Operations(AlembicContext.configure(connection=self.conn))
        return self._op

    @property
    def app(self) -> FunctionCalls:
        """The app's own Convex deployment (the original plan's main deployment), where
        the operator configured one (``BYOD_APP_CONVEX_URL`` and ``BYOD_APP_CONVEX_KEY``)."""
        if self._app is None:
            raise MigrationFailedError(
                "ctx.app: no app deployment is configured: set BYOD_APP_CONVEX_URL and "
                "BYOD_APP_CONVEX_KEY (ctx.main is the control plane's database)"
            )
        return self._app

    @property
    def convex(self) -> FunctionCalls:
        """The user's Convex deployment's functions (Convex instances)."""
        if self._convex is None:
            raise MigrationFailedError(
                f"ctx.convex: this instance is a {self.kind} database, not a Convex "
                "deployment: use ctx.conn (SQL) or ctx.op (Alembic operations)"
            )
        return self._convex


MigrationFn = Callable[[MigrationContext], None]


#: What a backfill does with one batch: its rows as plain tuples (key first, then ``columns``),
#: inside the batch's own instance transaction (``ctx.conn``).
BatchFn = Callable[[MigrationContext, Sequence[Any]], None]


#: A Convex page function's path: ``module:function`` (the app's, never one of byod's).
_PAGE_PATH = re.compile(r"[A-Za-z0-9_][\w/.-]*:[A-Za-z_$][\w$]*")


@dataclass(frozen=True)
class Backfill:
    """A data change over a whole table, in batches, each batch applied exactly once.

    On a SQL instance: rows are walked in ``key`` order, ``batch_size`` at a time, and
    ``apply`` is called for each batch inside its own short instance transaction, which
    also records the batch's cursor (last key, rows done) in the instance.

    On a Convex deployment: ``page`` names the app's internal mutation that does the work
    on one page of ``table`` (it takes ``{cursor, numItems}``, paginates, and returns
    ``{continueCursor, isDone, rows}``); byod's module runs it and moves the cursor in ONE
    Convex transaction (``byod:runBatch``), ``batch_size`` documents a page.

    Either way, a step interrupted between batches resumes after the last one committed.

    ``down_page`` (Convex): the app's internal mutation that undoes ``page`` on one page
    (same arguments and answer); the migration's rollback runs it over the whole table
    the same way, each page exactly once, resumable, before the migration's ``down``.
    """

    table: str
    key: str = ""
    apply: BatchFn | None = None
    columns: tuple[str, ...] = ()
    batch_size: int = 1000
    page: str | None = None
    down_page: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.table, str) or not self.table:
            raise RegistryError("a backfill needs a table (its name, as text)")
        if self.page is not None:
            self._check_page()
        else:
            self._check_sql()
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool):
            raise RegistryError(f"backfill of {self.table}: batch_size must be a whole number")
        if self.batch_size < 1:
            raise RegistryError(f"backfill of {self.table}: batch_size must be at least 1")

    def _check_page(self) -> None:
        page = self.page
        if not isinstance(page, str) or not _PAGE_PATH.fullmatch(page):
            raise RegistryError(
                f"backfill of {self.table}: page must name the app's page mutation as "
                '"module:function", e.g. "documents:tagPage"'
            )
        if page.startswith("byod:"):
            raise RegistryError(f"backfill of {self.table}: page cannot be one of byod's functions")
        down = self.down_page
        if down is not None and (
            not isinstance(down, str) or not _PAGE_PATH.fullmatch(down) or down.startswith("byod:")
        ):
            raise RegistryError(
                f"backfill of {self.table}: down_page must name the app's undo page mutation "
                'as "module:function", e.g. "documents:untagPage"'
            )
        if self.apply is not None or self.key or self.columns:
            raise RegistryError(
                f"backfill of {self.table}: a Convex backfill (page=...) does its work in the "
                "page mutation: give no apply, key or columns"
            )

    def _check_sql(self) -> None:
        if self.down_page is not None:
            raise RegistryError(
                f"backfill of {self.table}: down_page undoes a Convex page (page=...); a SQL "
                "backfill's undo belongs in the migration's down"
            )
        if not isinstance(self.key, str) or not self.key:
            raise RegistryError(
                f"backfill of {self.table}: give a key column (SQL) or a page mutation (Convex)"
            )
        if isinstance(self.columns, str) or not all(isinstance(c, str) for c in self.columns):
            raise RegistryError(
                f"backfill of {self.table}: columns must be a tuple of names, e.g. "
                f'("body",) (a bare string is not)'
            )
        object.__setattr__(self, "columns", tuple(self.columns))  # a list is fine too
        if not callable(self.apply):
            raise RegistryError(f"backfill of {self.table}: apply must be a function(ctx, rows)")


@dataclass(frozen=True)
class Migration:
    """One versioned step of the app's BYOD schema.

    ``up`` moves an instance from ``version - 1`` to ``version`` (the schema change, one
    transaction); ``backfills`` then change its data in batches (many short
    transactions), and ``finalize`` (one transaction) ends the step, with its stamp.
    ``down``, when given, undoes it. ``checksum`` is filled in by the loader from the
    file's syntax tree (see :mod:`byod.checksums`: formatting is not drift).

    ``gated``: a contract step (drop a column, make a field required): it runs on no user
    until every eligible user is through the steps before it and an operator opened its
    gate (``byod gate open``; see :mod:`byod.gates`).

    ``code_ref`` (Convex apps kept in git): the git ref (a commit, tag or branch) of the
    app code this step runs on; None: the commit that added the migration's file. Before
    the step, byod deploys that code to the deployment when it runs other code.
    """

    id: str
    version: int
    name: str
    description: str
    up: MigrationFn
    down: MigrationFn | None = None
    backfills: Sequence[Backfill] = ()
    finalize: MigrationFn | None = None
    gated: bool = False
    code_ref: str | None = None
    checksum: str = field(default="", compare=False)
    #: the file's bytes' checksum, as byod recorded applied migrations before syntax
    #: checksums (still accepted while the file is unchanged)
    legacy_checksum: str = field(default="", compare=False)
    #: the file it was loaded from ("" when made in code)
    source_path: str = field(default="", compare=False)

    def checksum_matches(self, applied: str) -> bool:
        """Whether ``applied`` (a stamp's checksum) is this migration's, as recorded now
        or by an older byod."""
        return applied == self.checksum or (
            bool(self.legacy_checksum) and applied == self.legacy_checksum
        )

    def __post_init__(self) -> None:
        if isinstance(self.backfills, Backfill):
            raise RegistryError(f"{self.id}: backfills must be a list: [Backfill(...)]")
        object.__setattr__(self, "backfills", tuple(self.backfills))  # a list is fine too

    @property
    def reversible(self) -> bool:
        """Whether this migration can be rolled back."""
        return self.down is not None

    @property
    def phased(self) -> bool:
        """Whether going up takes several transactions (backfills, or a finalize)."""
        return bool(self.backfills) or self.finalize is not None

    @property
    def reverse_backfills(self) -> tuple[Backfill, ...]:
        """What a rollback runs page by page before ``down``: each backfill that has a
        ``down_page``, last first, as a backfill whose page is that undo page."""
        return tuple(
            replace(b, page=b.down_page, down_page=None)
            for b in reversed(self.backfills)
            if b.down_page is not None
        )

    def backfills_for(self, direction: Direction) -> tuple[Backfill, ...]:
        """The backfills a step in ``direction`` runs: forward ones up, undo pages down."""
        return tuple(self.backfills) if direction == "up" else self.reverse_backfills


@dataclass(frozen=True)
class Step:
    """One migration to run in one direction."""

    migration: Migration
    direction: Direction

    @property
    def version_after(self) -> int:
        """The instance's version once this step is done."""
        m = self.migration
        return m.version if self.direction == "up" else m.version - 1


@dataclass(frozen=True)
class Plan:
    """What would run, in order: all steps go the same way, from one version to another."""

    direction: Direction
    from_version: int
    to_version: int
    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        if any(step.direction != self.direction for step in self.steps):
            raise PlanError("a plan cannot mix up and down steps")

    @property
    def empty(self) -> bool:
        """True when there is nothing to do."""
        return not self.steps


class Registry:
    """The ordered, validated migrations of an app; its head is the app's schema version."""

    def __init__(
        self,
        migrations: list[Migration],
        *,
        source: Path | None = None,
        keep_alembic_version: bool = False,
    ) -> None:
        self.source = source
        #: an Alembic history loaded so that each step also moves ``alembic_version``
        self.keep_alembic_version = keep_alembic_version
        self._by_version = sorted(migrations, key=lambda m: m.version)
        self._by_id = {m.id: m for m in self._by_version}
        _validate_sequence(self._by_version)

    @classmethod
    def load(cls, folder: Path) -> Registry:
        """Load and validate every ``NNN_slug.py`` in ``folder``.

        Raises :class:`RegistryError` naming the file for: a missing folder, a bad file
        name, an import or syntax error, no ``migration`` object, an id that is not the
        file name, a version that is not the file's number, a duplicate, a gap, or an
        ``up``/``down`` that is not callable.
        """
        if not folder.is_dir():
            raise RegistryError(f"migrations folder {folder} does not exist")
        migrations = [_load_file(path) for path in _migration_files(folder)]
        return cls(migrations, source=folder)

    def __iter__(self) -> Iterator[Migration]:
        return iter(self._by_version)

    def __len__(self) -> int:
        return len(self._by_version)

    @property
    def head(self) -> int:
        """The newest version (0 for an empty registry)."""
        return self._by_version[-1].version if self._by_version else 0

    def get(self, migration_id: str) -> Migration | None:
        """The migration with this id, if any."""
        return self._by_id.get(migration_id)

    def at(self, version: int) -> Migration | None:
        """The migration of ``version`` (None for 0, or a version not in the registry)."""
        if 1 <= version <= len(self._by_version):
            return self._by_version[version - 1]
        return None

    def after(self, version: int) -> list[Migration]:
        """Migrations newer than ``version``, oldest first."""
        return [m for m in self._by_version if m.version > version]

    def pending_count(self, version: int) -> int:
        """How many migrations an instance at ``version`` still needs."""
        return max(0, self.head - max(version, 0))

    def plan_up(self, current: int, target: int | None = None) -> Plan:
        """Steps from ``current`` up to ``target`` (default: head)."""
        target = self.head if target is None else target
        if not 0 <= target <= self.head:
            raise PlanError(f"version {target} is not known (head is {self.head})")
        if target < current:
            raise PlanError(
                f"the instance is at version {current}, above {target}: use rollback to go down"
            )
        steps = tuple(Step(m, "up") for m in self._by_version if current < m.version <= target)
        return Plan("up", current, target, steps)

    def plan_down(self, current: int, target: int) -> Plan:
        """Steps from ``current`` down to ``target``, newest first.

        Raises :class:`PlanError` when ``target`` is not below-or-at ``current``.
        Irreversible steps are kept in the plan; the runner refuses them before it
        touches anything.
        """
        if target < 0:
            raise PlanError(f"cannot roll back to version {target}: versions start at 0")
        if target > current:
            raise PlanError(
                f"the instance is at version {current}, below {target}: use migrate to go up"
            )
        steps = tuple(
            Step(m, "down") for m in reversed(self._by_version) if target < m.version <= current
        )
        return Plan("down", current, target, steps)


def _migration_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        if not _FILE_NAME.match(path.name):
            raise RegistryError(
                f"{path}: a migration file must be named NNN_slug.py "
                "(three or more digits, then lowercase words joined by _)"
            )
        if not path.is_file():
            raise RegistryError(f"{path}: a migration must be a file (this is a folder)")
        files.append(path)
    return files


#: a git ref as a migration may name it: no option (leading "-"), no spaces or controls
_CODE_REF = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./@{}^~+-]{0,199}")


def _load_file(path: Path) -> Migration:
    match = _FILE_NAME.match(path.name)
    assert match is not None  # checked by _migration_files
    number = int(match.group(1))
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise RegistryError(f"{path}: cannot be read: {exc.strerror}") from exc
    module_name = f"byod_migrations_{hashlib.sha1(str(path.parent).encode()).hexdigest()[:10]}"
    module_name += f".{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RegistryError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise RegistryError(f"{path}: syntax error on line {exc.lineno}: {exc.msg}") from exc
    except SystemExit as exc:
        raise RegistryError(
            f"{path}: exits while loading (SystemExit {exc.code!r}): a migration file must "
            "only define `migration`"
        ) from exc
    except Exception as exc:
        raise RegistryError(f"{path}: import failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.modules.pop(module_name, None)
    migration = getattr(module, "migration", None)
    if not isinstance(migration, Migration):
        raise RegistryError(f"{path}: must define `migration = Migration(...)`")
    if migration.id != path.stem:
        raise RegistryError(f"{path}: id {migration.id!r} must equal the file name {path.stem!r}")
    if migration.version != number:
        raise RegistryError(
            f"{path}: version {migration.version} must equal the file's number {number}"
        )
    if not callable(migration.up):
        raise RegistryError(f"{path}: `up` must be a function taking ctx")
    if migration.down is not None and not callable(migration.down):
        raise RegistryError(f"{path}: `down` must be a function taking ctx, or None")
    if migration.finalize is not None and not callable(migration.finalize):
        raise RegistryError(f"{path}: `finalize` must be a function taking ctx, or None")
    if not all(isinstance(b, Backfill) for b in migration.backfills):
        raise RegistryError(f"{path}: `backfills` must be Backfill(...) entries")
    if not isinstance(migration.gated, bool):
        raise RegistryError(f"{path}: `gated` must be True or False")
    if migration.code_ref is not None and not (
        isinstance(migration.code_ref, str) and _CODE_REF.fullmatch(migration.code_ref)
    ):
        raise RegistryError(
            f"{path}: `code_ref` must be a git ref (a commit, tag or branch name), "
            f"not {migration.code_ref!r}"
        )
    return replace(
        migration,
        checksum=source_checksum(source),
        legacy_checksum=bytes_checksum(source),
        source_path=str(path.resolve()),
    )


def _validate_sequence(migrations: list[Migration]) -> None:
    seen_ids: set[str] = set()
    for expected, migration in enumerate(migrations, start=1):
        if migration.id in seen_ids:
            raise RegistryError(f"{migration.id}.py: duplicate migration id {migration.id!r}")
        seen_ids.add(migration.id)
        if migration.version < expected:
            raise RegistryError(
                f"{migration.id}.py: duplicate version {migration.version} "
                f"(also {migrations[expected - 2].id}.py)"
            )
        if migration.version > expected:
            raise RegistryError(
                f"{migration.id}.py: gap in versions: it is version {migration.version} but "
                f"version {expected} is missing"
            )
