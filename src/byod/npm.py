"""byod's cache folder and the npm packages installed into it from a lock file.

Used for a Convex app's packages at each commit (:mod:`byod.targets.convex_code`) and for
the local Convex backend's own (:mod:`byod.commands.convex_local`): ``npm ci`` runs once
per lock file, under a file lock, and a folder counts as installed only once its marker
is written, so a crash mid-install is redone, never used half made.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from byod.errors import ByodError

__all__ = ["NPM_TIMEOUT", "default_cache", "file_lock", "installed"]

NPM_TIMEOUT = 900.0
_READY = ".byod-ready"
_THREADS = threading.RLock()


def default_cache() -> Path:
    """byod's cache folder: ``BYOD_CACHE_DIR``, else ``$XDG_CACHE_HOME/byod``, else
    ``~/.cache/byod``."""
    given = os.environ.get("BYOD_CACHE_DIR")
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "byod"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Held by one process (and thread) at a time: a cache entry is made once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _THREADS, path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def installed(
    place: Path,
    files: Mapping[str, Path],
    fail: Callable[[str], ByodError],
    on_install: Callable[[], None] = lambda: None,
) -> Path:
    """``place``, holding ``files`` (name -> source; a ``package.json`` and its
    ``package-lock.json`` among them) and the packages ``npm ci`` installed from them,
    made once and shared (``on_install`` is called before it is made); ``fail(message)``
    is raised when npm is missing or fails, or the cache folder cannot be written."""
    try:
        return _installed(place, files, fail, on_install)
    except OSError as exc:
        raise fail(f"cannot write {place.parent}: {exc.strerror or exc}") from None


def _installed(
    place: Path,
    files: Mapping[str, Path],
    fail: Callable[[str], ByodError],
    on_install: Callable[[], None],
) -> Path:
    with file_lock(place.parent / f".{place.name}.lock"):
        if (place / _READY).is_file():
            return place
        npm = shutil.which("npm")
        if npm is None:
            raise fail("npm is not installed (it comes with Node) and installs the packages")
        on_install()
        shutil.rmtree(place, ignore_errors=True)  # what a crash mid-install left
        place.mkdir(parents=True)
        for name, source in files.items():
            shutil.copyfile(source, place / name)
        command = [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--prefer-offline"]
        try:
            done = subprocess.run(
                command, cwd=place, capture_output=True, timeout=NPM_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            raise fail(f"npm ci did not finish in {NPM_TIMEOUT:.0f} s") from None
        if done.returncode != 0:
            raise fail(f"npm ci failed: {_gist(done.stderr or done.stdout)}")
        (place / _READY).write_text("")
    return place


def _gist(output: bytes) -> str:
    """npm's error in a line: what failed, and where its full log is (not its stack)."""
    lines = []
    for raw in output.decode("utf-8", "replace").splitlines():
        line = raw.removeprefix("npm error").removeprefix("npm ERR!")
        if (
            line[:1] == " "
            and line[1:2] not in (" ", "}", "")
            and not line[1:].startswith(("code ", "syscall ", "errno "))
        ):
            lines.append(line.strip())
    useful = [x for x in lines if not x.startswith("A complete log")][:1]
    return " | ".join(useful + [x for x in lines if x.startswith("A complete log")][:1])
