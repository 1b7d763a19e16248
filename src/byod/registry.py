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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from byod.errors import PlanError, RegistryError

if TYPE_CHECKING:
    from alembic.operations import Operations
    from sqlalchemy import Connection, Engine

__all__ = [
    "Backfill",
    "BatchFn",
    "Direction",
    "Migration",
    "MigrationContext",
    "Plan",
    "Registry",
    "Step",
]

Direction = Literal["up", "down"]
_FILE_NAME = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.py$")


@dataclass(frozen=True)
class MigrationContext:
    """What a migration's ``up``/``down`` gets.

    ``conn`` is the instance connection inside the migration's own transaction; ``op`` is
    Alembic's ``Operations`` bound to it (portable DDL); ``main`` is the app's control-plane
    engine, for reads; ``log`` is a logger that names the user and migration.
    """

    conn: Connection
    op: Operations
    main: Engine
    user_id: int
    clerk_id: str
    log: logging.LoggerAdapter[logging.Logger]


MigrationFn = Callable[[MigrationContext], None]


#: What a backfill does with one batch: its rows as plain tuples (key first, then ``columns``),
#: inside the batch's own instance transaction (``ctx.conn``).
BatchFn = Callable[[MigrationContext, Sequence[Any]], None]


@dataclass(frozen=True)
class Backfill:
    """A data change over a whole table, in batches: rows are walked in ``key`` order,
    ``batch_size`` at a time, and ``apply`` is called for each batch inside its own short
    instance transaction, which also records the batch's cursor (last key, rows done) in
    the instance. A batch is therefore applied exactly once, and a step interrupted
    between batches resumes after the last one committed."""

    table: str
    key: str
    apply: BatchFn
    columns: tuple[str, ...] = ()
    batch_size: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.table, str) or not isinstance(self.key, str):
            raise RegistryError("a backfill's table and key are names (text)")
        if not self.table or not self.key:
            raise RegistryError("a backfill needs a table and a key column")
        if isinstance(self.columns, str) or not all(isinstance(c, str) for c in self.columns):
            raise RegistryError(
                f"backfill of {self.table}: columns must be a tuple of names, e.g. "
                f'("body",) (a bare string is not)'
            )
        object.__setattr__(self, "columns", tuple(self.columns))  # a list is fine too
        if not callable(self.apply):
            raise RegistryError(f"backfill of {self.table}: apply must be a function(ctx, rows)")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool):
            raise RegistryError(f"backfill of {self.table}: batch_size must be a whole number")
        if self.batch_size < 1:
            raise RegistryError(f"backfill of {self.table}: batch_size must be at least 1")


@dataclass(frozen=True)
class Migration:
    """One versioned step of the app's BYOD schema.

    ``up`` moves an instance from ``version - 1`` to ``version`` (the schema change, one
    transaction); ``backfills`` then change its data in batches (many short
    transactions), and ``finalize`` (one transaction) ends the step, with its stamp.
    ``down``, when given, undoes it. ``checksum`` is filled in by the loader from the
    file's bytes.
    """

    id: str
    version: int
    name: str
    description: str
    up: MigrationFn
    down: MigrationFn | None = None
    backfills: Sequence[Backfill] = ()
    finalize: MigrationFn | None = None
    checksum: str = field(default="", compare=False)

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

    def __init__(self, migrations: list[Migration], *, source: Path | None = None) -> None:
        self.source = source
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
    if not all(isinstance(b, Backfill) and callable(b.apply) for b in migration.backfills):
        raise RegistryError(f"{path}: `backfills` must be Backfill(...) entries")
    return replace(migration, checksum=hashlib.sha256(source).hexdigest())


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
