"""Which app code a Convex deployment runs while it is migrated: with the app in git,
each step runs on the code of its migration's commit, and the deployment is left on the
code of the version reached; without git, the app folder as it is, deployed once.
"""

from __future__ import annotations

import contextlib
import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

from byod.errors import (
    DeployError,
)
from byod.registry import Migration
from byod.targets._convex_base import UNSET, ConvexDeployment
from byod.targets.convex_code import WORKTREE, AppCode, check_convex_version
from byod.targets.convex_deploy import Deploy

__all__ = ["ConvexAppCode"]


class ConvexAppCode(ConvexDeployment):
    """Deploys the app code each step needs (see the module)."""

    def prepare(self, first: Migration | None = None) -> None:
        """Make the deployment run the code the first step needs, under the deployment's
        lock (taken here; :class:`BusyError` while another runner holds it, nothing
        deployed): with the app in git, the code of ``first``'s commit when the
        deployment runs other code; else the app folder as it is, once for this target.
        :class:`DeployError` when the deploy fails."""
        with contextlib.suppress(DeployError):  # no byod module yet: nobody holds its lock
            self.hold()
        code = self._code()
        if code is not None:
            if first is not None:
                self._run_on(code.ref_for(first))
            return
        if self._deployed:
            return
        self._deploy_now(None)
        self._deployed = True

    def finish(self, at: Migration | None, head: bool) -> None:
        """After a plan's last step: with the app in git, leave the deployment on the code
        of the version reached (``HEAD``'s at the head, else the commit of ``at``, the
        migration of that version; none at version 0)."""
        code = self._code()
        if code is None or (at is None and not head):
            return
        self.hold()
        self._run_on(code.head_ref() if head else code.ref_for(at))  # type: ignore[arg-type]

    def _code(self) -> AppCode | None:
        if self._app_code is UNSET:
            self._app_code = self._deploy.app_code() if self._deploy is not None else None
        return self._app_code  # type: ignore[return-value]

    def _run_on(self, ref: str) -> None:
        """Deploy the code of ``ref`` unless the deployment runs it already (as byod's
        module, deployed with it, says)."""
        if ref != WORKTREE and self._running_ref() == ref:
            return
        if ref == WORKTREE and not _local(self.where):
            raise DeployError(
                f"{self.where}: uncommitted code (--allow-dirty) is deployed to local "
                "deployments only",
                hint="Commit the migration and the app code it needs, then run again.",
            )
        code = self._code()
        assert code is not None
        self._deploy_now(code.folder(ref))
        self._code_ref = ref

    def _running_ref(self) -> str | None:
        if self._code_ref is UNSET:
            try:
                answer = self._byod("codeRef", {})
            except DeployError:  # an older module, or none: unknown code
                answer = None
            ref = answer.get("ref") if isinstance(answer, dict) else None
            self._code_ref = ref if isinstance(ref, str) else None
        return self._code_ref  # type: ignore[return-value]

    def _deploy_now(self, folder: Path | None) -> None:
        deploy = self._deploy or Deploy(app_dir=None)
        app = folder or (Path(deploy.app_dir) if deploy.app_dir else None)
        if app is not None:
            check_convex_version(app, self.where)
        deploy.run(
            self.where,
            self._deploy_key,
            self.client.scrub,
            where=self.where,
            folder=folder,
            keep=self._keep,
        )

    def _keep(self) -> None:
        """Renew the lock while a deploy runs (when it is held: a deployment without
        byod's module has none yet)."""
        if self._held_until:
            self.hold()


def _local(base_url: str) -> bool:
    """Whether a deployment's URL names this machine (a loopback address or localhost)."""
    host = (urlsplit(base_url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
