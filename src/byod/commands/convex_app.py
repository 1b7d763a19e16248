"""``byod convex init DIR``: byod's Convex module added to an app's ``convex/`` folder.

The module is two files shipped in the package (``byod/convex_module``): ``byod.ts`` (the
internal functions byod calls: stamp, lock, progress, ``runBatch``) written as
``convex/byod.ts``, and ``tables.ts`` (byod's three tables) written as
``convex/byodTables.ts``, to spread into the app's ``schema.ts``. Files already there are
left alone when identical, and replaced only with ``force``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from byod.errors import InputError
from byod.targets.convex_code import MIN_CONVEX, convex_version

__all__ = ["MODULE_FILES", "SCHEMA_SNIPPET", "ConvexInitResult", "init_convex_app"]

MODULE_DIR = Path(__file__).resolve().parent.parent / "convex_module"
#: Each file written into the app's ``convex/`` folder, and its canonical copy.
MODULE_FILES = {"byod.ts": "byod.ts", "byodTables.ts": "tables.ts"}
#: byod's tables, as the module defines them.
TABLES = ("byod_schema_stamp", "byod_lock", "byod_schema_progress")
SCHEMA_SNIPPET = """import { defineSchema, defineTable } from "convex/server";
import { byodTables } from "./byodTables";

export default defineSchema({
  // ...the app's own tables, then byod's:
  ...byodTables,
});"""


@dataclass(frozen=True)
class ConvexInitResult:
    """What ``init_convex_app`` did: the ``convex/`` folder, the files written and those
    already up to date, and whether ``schema.ts`` already spreads ``byodTables``."""

    folder: Path
    written: tuple[str, ...]
    unchanged: tuple[str, ...]
    schema_ready: bool


def init_convex_app(app_dir: Path, *, force: bool = False) -> ConvexInitResult:
    """Add byod's module to the app at ``app_dir`` (the folder holding ``convex/``, or
    that ``convex/`` folder itself). :class:`InputError`, nothing written, when there is
    no such folder, the app's ``convex`` package is older than byod's module needs, or a
    file byod would write differs and ``force`` is not given."""
    folder = _convex_folder(app_dir)
    found = convex_version(folder.parent)
    if found is not None and found < MIN_CONVEX:
        need, have = ".".join(map(str, MIN_CONVEX)), ".".join(map(str, found))
        raise InputError(
            f"the app uses convex {have}; byod's module needs convex {need} or later "
            f"(upgrade it: npm install convex@^{need}); nothing was written"
        )
    planned: list[tuple[Path, bytes]] = []
    unchanged: list[str] = []
    for name, canonical in MODULE_FILES.items():
        content = (MODULE_DIR / canonical).read_bytes()
        target = folder / name
        if target.is_file() and target.read_bytes() == content:
            unchanged.append(name)
            continue
        if target.exists() and not force:
            raise InputError(
                f"{target} exists and is not this byod's copy (an older byod's, or the "
                "app's own file): run again with --force to replace it"
            )
        planned.append((target, content))
    for target, content in planned:
        try:
            target.write_bytes(content)
        except OSError as exc:
            raise InputError(f"cannot write {target}: {exc.strerror}") from None
    schema = folder / "schema.ts"
    ready = schema.is_file() and "byodTables" in schema.read_text(errors="replace")
    return ConvexInitResult(
        folder, tuple(target.name for target, _ in planned), tuple(unchanged), ready
    )


def _convex_folder(app_dir: Path) -> Path:
    if not app_dir.is_dir():
        raise InputError(f"{app_dir} is not a folder: give the Convex app's project folder")
    if app_dir.name == "convex":
        return app_dir
    folder = app_dir / "convex"
    if not folder.is_dir():
        raise InputError(
            f"{app_dir} has no convex/ folder: give the Convex app's project folder (where "
            "`npx convex dev` runs)"
        )
    return folder
