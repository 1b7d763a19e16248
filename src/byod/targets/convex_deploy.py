"""The deploy step of a Convex deployment: the app's schema and functions pushed to one
user's deployment by the app's own deploy command, before any migration runs there.

The command (default ``npx convex deploy --yes``) runs in the app's project folder, as a
child process without a shell. The deployment's URL and deploy key reach it only in its
environment (``CONVEX_DEPLOY_KEY`` for a ``.convex.cloud`` deployment;
``CONVEX_SELF_HOSTED_URL`` and ``CONVEX_SELF_HOSTED_ADMIN_KEY`` for a self-hosted one),
never in its arguments; byod's own ``BYOD_*`` settings (the encryption key, the control
plane's URL) are left out of it. Its output is scrubbed of the key before it is logged or
kept in an error. A deploy that failed for a passing reason (the deployment unreachable,
a timeout) is tried again, then reported as :class:`DeployError`; one that can only fail
the same way again (the data does not match the schema, the code does not build or
type-check, the key is refused) is reported at once, with the deploy's own message.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from byod.errors import DeployError, SettingsError
from byod.instance_url import InstancePolicy
from byod.text import printable

if TYPE_CHECKING:
    from byod.targets.convex_code import AppCode

__all__ = ["DEFAULT_COMMAND", "Deploy", "deploy_environment"]

log = logging.getLogger("byod.convex")

DEFAULT_COMMAND = "npx convex deploy --yes"
_SETTINGS_HINT = (
    "Set BYOD_CONVEX_APP to the app's folder (the one holding convex/) and BYOD_CONVEX_DEPLOY "
    "to a command that deploys it; see docs/tutorials/convex.md."
)
#: How many times a failing deploy is run before it is reported, and the waits between.
ATTEMPTS = 3
_WAITS = (1.0, 3.0)
#: What a deploy that will fail the same way again prints: the ``convex`` CLI's own
#: messages (convex 1.48, ``dist/esm/cli/lib/deploy2.js``: "Schema validation failed";
#: ``cli/lib/typecheck.js``: "TypeScript typecheck via `tsc` failed."; the bundler's
#: "Bundling failed"; tsc's "error TS"; the backend's codes for a schema or modules it
#: refuses and for a key it does not know), and the local stand-in's error codes.
DETERMINISTIC = (
    "Schema validation failed",
    "SchemaValidationFailed",
    "SchemaInvalid",
    "TypeScript typecheck via `tsc` failed",
    "error TS",
    "Bundling failed",
    "build failed",
    "InvalidModules",
    "BadAdminKey",
    "BadDeployKey",
    "MissingAccessToken",
)
#: How much of a failed command's output (its last lines) the error keeps.
_TAIL_LINES = 12
_TAIL_CHARS = 2000


#: How often a running deploy's ``keep`` callback is called (the lock renewed).
_KEEP_EVERY = 2.0
_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def _slots(concurrency: int) -> threading.BoundedSemaphore:
    with _SLOTS_LOCK:
        if concurrency not in _SLOTS:
            _SLOTS[concurrency] = threading.BoundedSemaphore(concurrency)
        return _SLOTS[concurrency]


@dataclass(frozen=True)
class Deploy:
    """How the app reaches a deployment: ``command`` run in ``app_dir`` (None: not
    configured, every deploy fails saying so), bounded by ``timeout`` seconds; ``code``
    says which code a step runs on (``git``: its own commit's, see
    :mod:`byod.targets.convex_code`; ``folder``: the app folder as it is; ``auto``: git
    when the app folder is in a git work tree); at most ``concurrency`` deploys run at
    once in this process."""

    app_dir: str | None
    command: str = DEFAULT_COMMAND
    timeout: float = 600.0
    code: str = "auto"
    allow_dirty: bool = False
    concurrency: int = 4

    @classmethod
    def of(cls, policy: InstancePolicy) -> Deploy:
        """The deploy step the operator's settings ask for."""
        return cls(
            policy.convex_app,
            policy.convex_deploy or DEFAULT_COMMAND,
            code=policy.convex_code,
            allow_dirty=policy.convex_allow_dirty,
            concurrency=policy.convex_deploy_concurrency,
        )

    def app_code(self) -> AppCode | None:
        """The app's commits, when steps run on their own commit's code (None: every step
        runs on the app folder as it is)."""
        from byod.targets.convex_code import app_code, in_git

        if self.app_dir is None or self.code == "folder":
            return None
        if self.code == "auto" and not in_git(Path(self.app_dir)):
            return None
        return app_code(self.app_dir, allow_dirty=self.allow_dirty)

    def run(
        self,
        base_url: str,
        deploy_key: str,
        scrub: Callable[[str], str],
        *,
        where: str,
        folder: Path | None = None,
        keep: Callable[[], None] | None = None,
        waits: tuple[float, ...] = _WAITS,
    ) -> None:
        """Deploy the app (``folder``, else the app folder) to the deployment at
        ``base_url`` with ``deploy_key``; ``keep`` is called every few seconds while it
        runs (the caller's lock renewed). A passing failure is tried again, then
        :class:`DeployError` with the command's last output lines, scrubbed."""
        argv = self._argv(folder)
        failure = ""
        for attempt in range(1, ATTEMPTS + 1):
            with _slots(self.concurrency):
                failure, final = self._once(
                    argv, deploy_environment(base_url, deploy_key), scrub, folder, keep
                )
            if not failure:
                log.info("%s: deployed the app (%s)", where, argv[0])
                return
            if final or any(marker in failure for marker in DETERMINISTIC):
                raise DeployError(f"{where}: the app did not deploy: {failure}")
            log.warning("%s: deploy attempt %d of %d failed: %s", where, attempt, ATTEMPTS, failure)
            if attempt < ATTEMPTS:
                time.sleep(waits[min(attempt - 1, len(waits) - 1)])
        raise DeployError(
            f"{where}: the app did not deploy after {ATTEMPTS} attempts, so no migration "
            f"ran there: {failure}"
        )

    def check(self) -> None:
        """:class:`SettingsError` (before a run starts) when the deploy step cannot work
        for any user: no app folder, no ``convex/`` in it, a command that does not parse
        or is not found."""
        try:
            argv = self._argv()
        except DeployError as exc:
            raise SettingsError(exc.message, hint=_SETTINGS_HINT) from None
        if shutil.which(argv[0], path=os.environ.get("PATH")) is None:
            raise SettingsError(
                f"the Convex deploy command {argv[0]!r} is not found (BYOD_CONVEX_DEPLOY)",
                hint=_SETTINGS_HINT,
            )

    def _argv(self, folder: Path | None = None) -> list[str]:
        if self.app_dir is None:
            raise DeployError(
                "no Convex app folder is configured: set BYOD_CONVEX_APP to the folder that "
                "holds the app's convex/ (or keep the migrations folder beside it)"
            )
        app = folder or Path(self.app_dir)
        if not (app / "convex").is_dir():
            raise DeployError(f"the Convex app folder {app} has no convex/ folder")
        try:
            argv = shlex.split(self.command)
        except ValueError as exc:
            raise DeployError(f"BYOD_CONVEX_DEPLOY does not parse: {exc}") from None
        if not argv:
            raise DeployError("BYOD_CONVEX_DEPLOY is empty")
        return argv

    def _once(
        self,
        argv: list[str],
        env: dict[str, str],
        scrub: Callable[[str], str],
        folder: Path | None,
        keep: Callable[[], None] | None,
    ) -> tuple[str, bool]:
        """Run the command once: "" when it succeeded, else what went wrong, and whether
        trying again is pointless (the command cannot be run at all)."""
        try:
            process = subprocess.Popen(
                argv,
                cwd=folder or self.app_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        except FileNotFoundError:
            return f"the deploy command {argv[0]!r} is not found (BYOD_CONVEX_DEPLOY)", True
        except PermissionError:
            return f"the deploy command {argv[0]!r} cannot be run (permission denied)", True
        output_bytes = _communicate(process, self.timeout, keep)
        if output_bytes is None:
            return f"the deploy command did not finish within {self.timeout:g} s", False
        output = scrub(output_bytes.decode("utf-8", "replace"))
        for line in output.splitlines():
            log.debug("deploy: %s", printable(line))
        if process.returncode == 0:
            return "", False
        lines = [line for line in output.strip().splitlines() if line.strip()]
        tail = " | ".join(lines[-_TAIL_LINES:])[-_TAIL_CHARS:]
        exited = f"the deploy command exited with {process.returncode}"
        return exited + (f": {tail}" if tail else ""), False


def _communicate(
    process: subprocess.Popen[bytes], timeout: float, keep: Callable[[], None] | None
) -> bytes | None:
    """The process's output once it exits (None: killed after ``timeout`` seconds),
    calling ``keep`` every few seconds meanwhile; an exception of ``keep`` (the lock
    lost) kills the process and goes up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            wait = max(0.0, min(_KEEP_EVERY, deadline - time.monotonic()))
            out, _ = process.communicate(timeout=wait)
            return out
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                process.kill()
                process.communicate()
                return None
            if keep is not None:
                try:
                    keep()
                except BaseException:
                    process.kill()
                    process.communicate()
                    raise


def deploy_environment(
    base_url: str, deploy_key: str, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The deploy command's environment: byod's own minus its ``BYOD_*`` settings, plus
    the deployment's URL and key under the names the ``convex`` CLI reads."""
    source = os.environ if env is None else env
    child = {
        name: value
        for name, value in source.items()
        if not name.startswith(("BYOD_", "CONVEX_DEPLOY_KEY", "CONVEX_SELF_HOSTED_"))
    }
    if base_url.startswith("https://") and base_url.endswith(".convex.cloud"):
        child["CONVEX_DEPLOY_KEY"] = deploy_key
    else:
        child["CONVEX_SELF_HOSTED_URL"] = base_url
        child["CONVEX_SELF_HOSTED_ADMIN_KEY"] = deploy_key
    return child
