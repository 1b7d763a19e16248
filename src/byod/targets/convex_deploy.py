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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from byod.errors import DeployError, SettingsError
from byod.instance_url import InstancePolicy
from byod.text import printable

__all__ = ["DEFAULT_COMMAND", "Deploy", "deploy_environment"]

log = logging.getLogger("byod.convex")

DEFAULT_COMMAND = "npx convex deploy --yes"
_SETTINGS_HINT = (
    "Set BYOD_CONVEX_APP to the app's folder (the one holding convex/) and BYOD_CONVEX_DEPLOY "
    "to a command that deploys it; see Convex deployments in the README."
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


@dataclass(frozen=True)
class Deploy:
    """How the app reaches a deployment: ``command`` run in ``app_dir`` (None: not
    configured, every deploy fails saying so), bounded by ``timeout`` seconds."""

    app_dir: str | None
    command: str = DEFAULT_COMMAND
    timeout: float = 600.0

    @classmethod
    def of(cls, policy: InstancePolicy) -> Deploy:
        """The deploy step the operator's settings ask for."""
        return cls(policy.convex_app, policy.convex_deploy or DEFAULT_COMMAND)

    def run(
        self,
        base_url: str,
        deploy_key: str,
        scrub: Callable[[str], str],
        *,
        where: str,
        waits: tuple[float, ...] = _WAITS,
    ) -> None:
        """Deploy to the deployment at ``base_url`` with ``deploy_key``; retried, then
        :class:`DeployError` with the command's last output lines, scrubbed."""
        argv = self._argv()
        failure = ""
        for attempt in range(1, ATTEMPTS + 1):
            failure, final = self._once(argv, deploy_environment(base_url, deploy_key), scrub)
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

    def _argv(self) -> list[str]:
        if self.app_dir is None:
            raise DeployError(
                "no Convex app folder is configured: set BYOD_CONVEX_APP to the folder that "
                "holds the app's convex/ (or keep the migrations folder beside it)"
            )
        if not (Path(self.app_dir) / "convex").is_dir():
            raise DeployError(f"the Convex app folder {self.app_dir} has no convex/ folder")
        try:
            argv = shlex.split(self.command)
        except ValueError as exc:
            raise DeployError(f"BYOD_CONVEX_DEPLOY does not parse: {exc}") from None
        if not argv:
            raise DeployError("BYOD_CONVEX_DEPLOY is empty")
        return argv

    def _once(
        self, argv: list[str], env: dict[str, str], scrub: Callable[[str], str]
    ) -> tuple[str, bool]:
        """Run the command once: "" when it succeeded, else what went wrong, and whether
        trying again is pointless (the command cannot be run at all)."""
        try:
            done = subprocess.run(
                argv,
                cwd=self.app_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            return f"the deploy command {argv[0]!r} is not found (BYOD_CONVEX_DEPLOY)", True
        except PermissionError:
            return f"the deploy command {argv[0]!r} cannot be run (permission denied)", True
        except subprocess.TimeoutExpired:
            return f"the deploy command did not finish within {self.timeout:g} s", False
        output = scrub((done.stdout + done.stderr).decode("utf-8", "replace"))
        for line in output.splitlines():
            log.debug("deploy: %s", printable(line))
        if done.returncode == 0:
            return "", False
        lines = [line for line in output.strip().splitlines() if line.strip()]
        tail = " | ".join(lines[-_TAIL_LINES:])[-_TAIL_CHARS:]
        exited = f"the deploy command exited with {done.returncode}"
        return exited + (f": {tail}" if tail else ""), False


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
