"""An Alembic history run as it is: its revisions become byod :class:`Migration` s.

A team's existing ``versions/`` folder needs no rewrite. The chain is read from each
file's ``revision`` and ``down_revision`` (by Alembic's own ``ScriptDirectory``), ordered
from its base and numbered 1…N; each step is named by its revision id (what the
instance's stamp records, so a rebased chain is drift, never a silent re-run) and its
message. ``upgrade()`` and ``downgrade()`` run with ``from alembic import op`` bound to the
user's instance and transaction.

``op`` is one module-level proxy in Alembic: ``alembic.op.create_table`` reads the module
global ``_proxy`` at call time. byod writes its own dispatcher there once per process, which
forwards each call to the ``Operations`` of the step running in the *current* thread (a
:class:`contextvars.ContextVar`), so concurrent steps never cross tenants; each step puts it
back at its start and fails if it is gone at its end (an in-process ``alembic`` command
replaced it meanwhile). Alembic's ``env.py`` is never run; a revision that uses
``alembic.context`` (offline mode, ``-x`` arguments) is refused when the folder loads.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from byod.checksums import bytes_checksum, source_checksum
from byod.errors import MigrationFailedError, RegistryError
from byod.registry import Migration, MigrationContext

if TYPE_CHECKING:
    from alembic.operations import Operations
    from alembic.script import Script, ScriptDirectory

__all__ = ["alembic_location", "load_alembic_history", "operations_in_use"]

_current: contextvars.ContextVar[Operations] = contextvars.ContextVar("byod_alembic_operations")


class _Dispatcher:
    """What ``alembic.op`` calls: the current step's ``Operations``, per thread."""

    def __getattr__(self, name: str) -> Any:
        operations = _current.get(None)
        if operations is None:
            raise NameError(
                f"alembic.op.{name} was called outside a byod step: an Alembic revision's "
                "upgrade()/downgrade() reach `op` only while byod runs them"
            )
        return getattr(operations, name)


_DISPATCHER = _Dispatcher()


def _install() -> None:
    import alembic.op

    alembic.op.__dict__["_proxy"] = _DISPATCHER


def _installed() -> bool:
    import alembic.op

    return alembic.op.__dict__.get("_proxy") is _DISPATCHER


@contextlib.contextmanager
def operations_in_use(operations: Operations, revision: str) -> Iterator[None]:
    """``alembic.op`` forwards to ``operations`` in this thread while the block runs;
    :class:`MigrationFailedError` when something replaced byod's dispatcher meanwhile
    (then the step's work may have gone elsewhere: it is rolled back)."""
    _install()
    token = _current.set(operations)
    try:
        yield
    finally:
        _current.reset(token)
    if not _installed():
        _install()
        raise MigrationFailedError(
            f"{revision}: alembic.op was replaced while the step ran (an Alembic command "
            "run in this process?): the step is rolled back; run it again"
        )


def alembic_location(path: Path) -> bool:
    """Whether ``path`` is an Alembic history: an ``alembic.ini``, a script location
    (a folder with ``env.py`` or ``script.py.mako`` and ``versions/``), or a bare
    ``versions/`` folder (its files declare ``revision`` and ``down_revision``)."""
    if path.is_file():
        return path.suffix == ".ini"
    if (path / "alembic.ini").is_file():
        return True
    if (path / "versions").is_dir() and any((path / n).is_file() for n in _SCRIPT_FILES):
        return True
    return path.is_dir() and any(_declares_revision(f) for f in sorted(path.glob("*.py")))


_SCRIPT_FILES = ("env.py", "script.py.mako")


def _declares_revision(path: Path) -> bool:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return "down_revision" in text and "revision" in text


def load_alembic_history(path: Path, *, keep_alembic_version: bool = False) -> list[Migration]:
    """The revisions at ``path`` (see :func:`alembic_location`) as migrations numbered
    1…N from the base. :class:`RegistryError` for a branch, a merge point, a
    ``depends_on``, a revision that cannot be imported or uses ``alembic.context``.
    ``keep_alembic_version``: each step also sets the instance's ``alembic_version`` to
    where it leaves the chain, in the step's own transaction, so an app that still runs
    ``alembic upgrade head`` at start finds nothing to do."""
    script = _script_directory(path)
    try:
        heads, bases = script.get_heads(), script.get_bases()
        revisions = list(reversed(list(script.walk_revisions())))
    except Exception as exc:  # Alembic's own errors: a broken chain, a bad file
        raise RegistryError(f"{path}: the Alembic history cannot be read: {exc}") from exc
    if len(heads) > 1 or len(bases) > 1:
        raise RegistryError(
            f"{path}: the Alembic history branches (heads {', '.join(sorted(heads))}; bases "
            f"{', '.join(sorted(bases))}): byod runs one straight chain; merge the branches "
            "first (`alembic merge`) and flatten the merge into the chain"
        )
    return [
        _migration(rev, number, keep_alembic_version)
        for number, rev in enumerate(revisions, start=1)
    ]


def _script_directory(path: Path) -> ScriptDirectory:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    ini = path if path.is_file() else path / "alembic.ini"
    try:
        if ini.is_file():
            config = Config(str(ini))
            for entry in reversed(config.get_prepend_sys_paths_list() or []):
                if entry not in sys.path:
                    sys.path.insert(0, entry)
            return ScriptDirectory.from_config(config)
        if (path / "versions").is_dir():
            return ScriptDirectory(str(path))
        return ScriptDirectory(str(path.parent), version_locations=[str(path)])
    except Exception as exc:
        raise RegistryError(f"{path}: not an Alembic script location: {exc}") from exc


def _migration(rev: Script, number: int, keep_version: bool) -> Migration:
    where = rev.path
    if rev.is_merge_point or rev.dependencies:
        joined = ", ".join(sorted({*_tuple(rev.down_revision), *_tuple(rev.dependencies)}))
        raise RegistryError(
            f"{where}: revision {rev.revision} merges or depends on {joined}: byod runs one "
            "straight chain (no merge points, no depends_on)"
        )
    source = Path(where).read_bytes()
    if _uses_context(source):
        raise RegistryError(
            f"{where}: revision {rev.revision} uses alembic.context (offline mode, -x "
            "arguments, env.py's settings): byod runs upgrade()/downgrade() on each "
            "instance's connection and never runs env.py; use op.get_bind() instead"
        )
    module = rev.module
    upgrade = getattr(module, "upgrade", None)
    if not callable(upgrade):
        raise RegistryError(f"{where}: revision {rev.revision} has no upgrade()")
    downgrade = getattr(module, "downgrade", None)
    message = (rev.doc or "").strip() or rev.revision
    below = rev.down_revision if isinstance(rev.down_revision, str) else None
    after_up, after_down = (rev.revision, below) if keep_version else (_KEEP, _KEEP)
    return Migration(
        id=rev.revision,
        version=number,
        name=message.splitlines()[0][:200],
        description=message,
        up=_step(upgrade, rev.revision, after_up),
        down=_step(downgrade, rev.revision, after_down) if callable(downgrade) else None,
        checksum=source_checksum(source),
        legacy_checksum=bytes_checksum(source),
    )


def _set_alembic_version(ctx: MigrationContext, revision: str | None) -> None:
    """``alembic_version`` holds ``revision`` (none at the base), as Alembic keeps it;
    the table is made as Alembic makes it where it is missing."""
    import sqlalchemy as sa

    table = sa.table("alembic_version", sa.column("version_num"))
    if not sa.inspect(ctx.conn).has_table("alembic_version"):
        ctx.op.create_table(
            "alembic_version",
            sa.Column("version_num", sa.String(32), nullable=False),
            sa.PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
        )
    ctx.conn.execute(table.delete())
    if revision is not None:
        ctx.conn.execute(table.insert().values(version_num=revision))


def _tuple(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)  # type: ignore[attr-defined]


def _uses_context(source: bytes) -> bool:
    """Whether the revision imports ``alembic.context`` (``from alembic import context``,
    ``import alembic.context``, ``alembic.context.…``)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False  # the import reports it, with its line
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (
            node.module == "alembic.context"
            or (node.module == "alembic" and any(a.name == "context" for a in node.names))
        ):
            return True
        if isinstance(node, ast.Import) and any(a.name == "alembic.context" for a in node.names):
            return True
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "context"
            and isinstance(node.value, ast.Name)
            and node.value.id == "alembic"
        ):
            return True
    return False


#: a step that leaves ``alembic_version`` alone
_KEEP = "\x00keep"


def _step(
    function: Callable[[], None], revision: str, leaves_at: str | None
) -> Callable[[MigrationContext], None]:
    """A revision's ``upgrade``/``downgrade`` as a byod step: ``alembic.op`` bound to the
    step's instance connection and transaction (``ctx.op``) for its whole run; then,
    unless ``leaves_at`` is ``_KEEP``, ``alembic_version`` set to ``leaves_at`` (None:
    emptied, the base) in that same transaction."""

    def run(ctx: MigrationContext) -> None:
        with operations_in_use(ctx.op, revision):
            function()
        if leaves_at != _KEEP:
            _set_alembic_version(ctx, leaves_at)

    run.__name__ = getattr(function, "__name__", "step")
    return run
