"""The app code each step of a Convex rollout runs on.

A Convex migration is written against the app's code of its time: widen (a new optional
field and the backfill that fills it) needs the code that writes the field, narrow (the
field made required) needs data the backfill has reached. So when the app's folder is in
a git repository, each step runs on its own commit's code: by default the commit that
added the migration's file, or the ref its ``code_ref`` names. Before a step byod deploys
that code when the deployment runs other code, and after the last step the code of the
version reached (the repository's ``HEAD`` at the head version).

How a commit's code is made ready (:meth:`AppCode.folder`): the app's folder at that
commit (``git archive``) in byod's cache, byod's own module written over the app's copy
(this byod's functions, whatever the commit holds, with the commit named in it so
``byod:codeRef`` tells which code runs — a deploy made outside byod says null), and the
commit's npm packages: its ``package-lock.json`` installed once per distinct lock file
(``npm ci``) and shared, or the app folder's own ``node_modules`` when the lock file is
the same. The ``convex`` package must be at least :data:`MIN_CONVEX`.

A migration file that is not committed is refused (its code cannot be named), unless
``allow_dirty``: its step (and the head) then runs on the app folder as it is.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from byod.errors import DeployError, SettingsError
from byod.npm import default_cache, file_lock, installed
from byod.registry import Migration

__all__ = [
    "MIN_CONVEX",
    "WORKTREE",
    "AppCode",
    "app_code",
    "check_convex_version",
    "convex_version",
    "in_git",
]

log = logging.getLogger("byod.convex")

#: The oldest ``convex`` package byod's module works with: it calls the app's page
#: mutation with ``ctx.runMutation`` inside a mutation (a sub-transaction), released with
#: components in convex 1.16 (CHANGELOG, 1.16.1: "Release components"), and declares
#: ``returns:`` validators (1.13.0); 1.17.0 is the first release after both.
MIN_CONVEX = (1, 17, 0)
#: The name of "the app folder as it is" (uncommitted code, ``--allow-dirty``).
WORKTREE = "worktree"
_MODULE_DIR = Path(__file__).resolve().parent.parent / "convex_module"
_DEPLOYED_LINE = "const DEPLOYED_CODE: string | null = null;"
_GIT_TIMEOUT = 60.0


def in_git(folder: Path) -> bool:
    """Whether ``folder`` is inside a git work tree (and git is installed); asked once per
    folder and process, not once per user."""
    return _in_git(str(folder.resolve()))


@functools.cache
def _in_git(folder: str) -> bool:
    try:
        return _git(Path(folder), "rev-parse", "--is-inside-work-tree").strip() == "true"
    except (DeployError, SettingsError):
        return False


def convex_version(app_dir: Path) -> tuple[int, ...] | None:
    """The ``convex`` package version the app at ``app_dir`` gets (its installed one,
    else its lock file's); None when the app names no convex package of its own."""
    installed = app_dir / "node_modules" / "convex" / "package.json"
    try:
        if installed.is_file():
            return _version(json.loads(installed.read_text())["version"])
        lock = app_dir / "package-lock.json"
        if lock.is_file():
            packages = json.loads(lock.read_text()).get("packages", {})
            entry = packages.get("node_modules/convex")
            if isinstance(entry, dict) and "version" in entry:
                return _version(entry["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def check_convex_version(app_dir: Path, where: str) -> None:
    """:class:`DeployError` when the app's ``convex`` package is older than
    :data:`MIN_CONVEX` (no known version: nothing to check)."""
    found = convex_version(app_dir)
    if found is not None and found < MIN_CONVEX:
        raise DeployError(
            f"{where}: the app uses convex {_dotted(found)}; byod's module needs convex "
            f"{_dotted(MIN_CONVEX)} or later",
            hint="Upgrade the app's convex package (npm install convex@latest) and commit it.",
        )


def _version(text: str) -> tuple[int, ...]:
    core = text.split("-", 1)[0].split("+", 1)[0]
    return tuple(int(part) for part in core.split(".")[:3])


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


@dataclass(frozen=True)
class _Repository:
    root: Path
    #: the app folder, relative to the root ("" when the app is the repository)
    app: str


class AppCode:
    """A Convex app kept in git: which commit each step runs on, and that commit's code
    made ready to deploy. Shared by every target of a process (see :func:`app_code`);
    its lookups are cached and its methods safe from several threads."""

    def __init__(self, app_dir: Path, cache: Path, *, allow_dirty: bool = False) -> None:
        self.app_dir = app_dir.resolve()
        self.cache = cache
        self.allow_dirty = allow_dirty
        top = Path(_git(self.app_dir, "rev-parse", "--show-toplevel").strip()).resolve()
        self._repo = _Repository(top, self.app_dir.relative_to(top).as_posix())
        self._refs: dict[tuple[str, str | None], str] = {}
        self._folders: dict[str, Path] = {}
        self._lock = threading.Lock()

    def ref_for(self, migration: Migration) -> str:
        """The commit (full sha) ``migration``'s step runs on, or :data:`WORKTREE`.
        :class:`SettingsError` when it cannot be named: an unknown ``code_ref``, a file
        that is not committed (without ``allow_dirty``) or not in the repository."""
        key = (migration.source_path or migration.id, migration.code_ref)
        with self._lock:
            if key not in self._refs:
                self._refs[key] = self._find_ref(migration)
            return self._refs[key]

    def head_ref(self) -> str:
        """The code to leave deployed at the head version: ``HEAD``'s commit, or the app
        folder as it is when it has uncommitted changes and ``allow_dirty``."""
        with self._lock:
            if ("HEAD", None) not in self._refs:
                dirty = self._dirty(self._repo.app or ".")
                if dirty and self.allow_dirty:
                    self._refs[("HEAD", None)] = WORKTREE
                else:
                    if dirty:
                        log.warning(
                            "the app folder %s has uncommitted changes: byod deploys HEAD's "
                            "code, not them",
                            self.app_dir,
                        )
                    self._refs[("HEAD", None)] = self._commit("HEAD")
            return self._refs[("HEAD", None)]

    def folder(self, ref: str) -> Path:
        """The app folder to deploy for ``ref``: ready, with byod's module naming it."""
        if ref == WORKTREE:
            return self.app_dir
        with self._lock:
            known = self._folders.get(ref)
        if known is not None:
            return known
        made = self._materialize(ref)
        with self._lock:
            self._folders[ref] = made
        return made

    # -- refs ----------------------------------------------------------------------------

    def _find_ref(self, migration: Migration) -> str:
        if migration.code_ref is not None:
            return self._commit(migration.code_ref, f"{migration.id}: code_ref")
        if not migration.source_path:
            raise SettingsError(f"{migration.id}: no file to find its commit by: give code_ref")
        path = Path(migration.source_path)
        try:
            relative = path.resolve().relative_to(self._repo.root).as_posix()
        except ValueError:
            raise SettingsError(
                f"{path} is not in the app's git repository ({self._repo.root}): byod cannot "
                "tell which commit's code its step runs on",
                hint="Keep the migrations in the app's repository, or give the migration "
                "code_ref='<commit>'.",
            ) from None
        if self._dirty(relative):
            if self.allow_dirty:
                return WORKTREE
            raise SettingsError(
                f"{path} is not committed: each step runs on the code of the commit that "
                "added its migration, so commit it first",
                hint="Commit the migration and the app code it needs (or, against local "
                "deployments only, `byod migrate --allow-dirty`).",
            )
        added = _git(
            self._repo.root, "log", "--diff-filter=A", "--format=%H", "-n", "1", "--", relative
        ).strip()
        if not added:
            raise SettingsError(f"{path}: git knows no commit that added it")
        return added

    def _commit(self, ref: str, what: str = "ref") -> str:
        try:
            found = _git(self._repo.root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
            return found.strip()
        except SettingsError:
            raise SettingsError(
                f"{what} {ref!r} is not a commit of the app's repository ({self._repo.root})"
            ) from None

    def _dirty(self, relative: str) -> bool:
        status = _git(
            self._repo.root, "status", "--porcelain", "--untracked-files=all", "--", relative
        )
        return bool(status.strip())

    # -- a commit's code -----------------------------------------------------------------

    def _materialize(self, sha: str) -> Path:
        key = hashlib.sha256(f"{self._repo.root}\0{self._repo.app}".encode()).hexdigest()[:12]
        home = self.cache / "convex-code" / f"{sha[:20]}-{key}"
        app = home / self._repo.app if self._repo.app else home
        with file_lock(self.cache / "convex-code" / f".{sha[:20]}-{key}.lock"):
            if not (home / ".byod-ready").is_file():
                self._extract(sha, home)
                (home / ".byod-ready").write_text(sha + "\n")
        return app

    def _extract(self, sha: str, home: Path) -> None:
        if home.exists():
            shutil.rmtree(home)  # a half-made folder of a process that died
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=home.parent))
        try:
            archive = _git_bytes(
                self._repo.root, "archive", "--format=tar", sha, "--", self._repo.app or "."
            )
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                tar.extractall(staging, filter="data")
            app = staging / self._repo.app if self._repo.app else staging
            self._overlay_module(app, sha)
            self._link_packages(app, sha)
            staging.rename(home)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _overlay_module(self, app: Path, sha: str) -> None:
        convex = app / "convex"
        schema = convex / "schema.ts"
        if not convex.is_dir():
            raise DeployError(f"at commit {sha[:12]} the app has no convex/ folder")
        if not schema.is_file() or "byodTables" not in schema.read_text(errors="replace"):
            raise DeployError(
                f"at commit {sha[:12]} the app's convex/schema.ts does not spread byodTables: "
                "byod's module cannot run on that code",
                hint="Add byod's module (`byod convex init`) in a commit before the "
                "migrations that need it, or give those migrations a later code_ref.",
            )
        module = (_MODULE_DIR / "byod.ts").read_text()
        if _DEPLOYED_LINE not in module:  # pragma: no cover - the canonical file holds it
            raise DeployError("byod's module has no DEPLOYED_CODE line to name the commit")
        stamped = module.replace(_DEPLOYED_LINE, f"const DEPLOYED_CODE: string | null = {sha!r};")
        (convex / "byod.ts").write_text(stamped)
        (convex / "byodTables.ts").write_bytes((_MODULE_DIR / "tables.ts").read_bytes())

    def _link_packages(self, app: Path, sha: str) -> None:
        if not (app / "package.json").is_file():
            return  # the app brings no packages of its own (the deploy command's are used)
        lock = app / "package-lock.json"
        if not lock.is_file():
            raise DeployError(
                f"at commit {sha[:12]} the app has a package.json but no package-lock.json: "
                "byod installs each commit's packages from its lock file"
            )
        own_lock = self.app_dir / "package-lock.json"
        own_modules = self.app_dir / "node_modules"
        if (
            own_modules.is_dir()
            and own_lock.is_file()
            and own_lock.read_bytes() == lock.read_bytes()
        ):
            modules = own_modules
        else:
            modules = self._installed(lock)
        (app / "node_modules").symlink_to(modules, target_is_directory=True)

    def _installed(self, lock: Path) -> Path:
        """``node_modules`` for this lock file, installed once (``npm ci``) and shared."""
        digest = hashlib.sha256(lock.read_bytes()).hexdigest()[:20]
        files = {"package.json": lock.parent / "package.json", "package-lock.json": lock}
        place = installed(
            self.cache / "npm" / digest,
            files,
            fail=lambda message: DeployError(f"the app's packages: {message}"),
            on_install=lambda: log.info("installing the app's npm packages (lock file %s)", digest),
        )
        return place / "node_modules"


_SHARED: dict[tuple[str, str, bool], AppCode] = {}
_SHARED_LOCK = threading.Lock()


def app_code(app_dir: str, cache: Path | None = None, *, allow_dirty: bool = False) -> AppCode:
    """The process's one :class:`AppCode` for this app folder and settings."""
    where = cache or default_cache()
    key = (str(Path(app_dir).resolve()), str(where), allow_dirty)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = AppCode(Path(app_dir), where, allow_dirty=allow_dirty)
        return _SHARED[key]


def _git(cwd: Path, *args: str) -> str:
    return _git_bytes(cwd, *args).decode("utf-8", "replace")


def _git_bytes(cwd: Path, *args: str) -> bytes:
    git = shutil.which("git")
    if git is None:
        raise SettingsError("git is not installed: byod reads the app's commits with it")
    try:
        done = subprocess.run(
            [git, *args],
            cwd=cwd,
            capture_output=True,
            timeout=_GIT_TIMEOUT,
            check=False,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"},
        )
    except subprocess.TimeoutExpired:
        raise DeployError(f"git {args[0]} did not finish in {_GIT_TIMEOUT:g} s") from None
    except OSError as exc:
        raise SettingsError(f"git cannot be run: {exc.strerror}") from None
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise SettingsError(f"git {args[0]} failed in {cwd}: {' '.join(message[-2:])}")
    return done.stdout
