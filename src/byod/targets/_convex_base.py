"""What every operation on a Convex deployment shares: the client, byod's module's
functions (``byod:*``) and how their refusals become byod's errors, and the deployment's
lock, taken and renewed before any write (see :mod:`byod.targets.convex`).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal, NoReturn, Self

from byod.errors import (
    BusyError,
    ByodError,
    DeployError,
    DriftError,
    InstanceTimeoutError,
    MigrationFailedError,
)
from byod.targets.backfill import Progress
from byod.targets.base import (
    StampEntry,
)
from byod.targets.convex_client import ConvexClient, FunctionError
from byod.targets.convex_deploy import Deploy

__all__ = ["MODULE", "TRANSACTION_LIMIT", "UNSET", "ConvexDeployment", "FunctionKind"]

MODULE = "byod"

FunctionKind = Literal["query", "mutation", "action"]
#: A function stopped by a transaction limit: convex-test's words ("Read too much data
#: in a single function execution (limit: …)", "Scanned too many documents …", "Wrote too
#: much data …", "Wrote too many documents …"; convex-test 0.0.60,
#: dist/transactionMetrics.js, which copies the backend's phrase). The real backend's
#: source is not on this machine to cite: its limit errors are matched by that same
#: phrase and by the TooMany* error codes as remembered, not checked against it.
TRANSACTION_LIMIT = re.compile(
    r"in a single function execution|\bTooMany(?:Reads|Writes|BytesRead|BytesWritten|"
    r"DocumentsRead|DocumentsWritten)\b"
)
UNSET = object()
_NOT_FOUND = "Could not find"


class ConvexDeployment:
    """One user's Convex deployment, reached with its deploy key, and its lock."""

    kind = "convex"

    def __init__(
        self,
        client: ConvexClient,
        deploy_key: str,
        *,
        hold_seconds: float = 30.0,
        deploy: Deploy | None = None,
        owner: str | None = None,
    ) -> None:
        self.client = client
        self.where = client.base
        self._deploy_key = deploy_key
        self._deploy = deploy
        self.hold_seconds = max(hold_seconds, 2.0)
        self.owner = owner or f"byod-{uuid.uuid4().hex[:16]}"
        self._held_until = 0.0  # time.monotonic() until which the lock is ours
        self._deployed = False
        self._app_code: object = UNSET
        #: the app commit the deployment runs, as its module says (None: unknown)
        self._code_ref: object = UNSET
        #: the stamp as read while holding the lock, kept up to date by this target's
        #: own writes (nobody else writes it while the lock is held); None: read it
        self._locked_stamp: list[StampEntry] | None = None
        #: the steps in progress, read and kept the same way
        self._locked_progress: dict[str, Progress] | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def holds_control_plane(self, control_plane_id: str) -> bool:
        """Never: byod's control plane is a SQL database."""
        return False

    def defer_control_plane_check(self, control_plane_id: str) -> bool:
        """Nothing to defer: :meth:`holds_control_plane` asks nothing."""
        return False

    def close(self) -> None:
        """Give the lock back (when held) and close the connections."""
        try:
            if self._held_until:
                self._byod("releaseLock", {"owner": self.owner}, timeout=5.0)
        except ByodError:
            pass  # it expires on its own
        finally:
            self._held_until = 0.0
            self.client.close()

    def hold(self) -> None:
        """Take the deployment's lock, or renew it once half of its hold is gone;
        :class:`BusyError` when another runner holds it."""
        now = time.monotonic()
        if self._held_until - now > self.hold_seconds / 2:
            return
        if self._held_until <= now:  # not held, or lapsed: another runner may have written
            self._forget()
        ttl_ms = int(self.hold_seconds * 1000)
        if self._byod("takeLock", {"owner": self.owner, "ttlMs": ttl_ms}):
            self._held_until = now + self.hold_seconds
            return
        lost = self._held_until > 0
        self._held_until = 0.0
        self._forget()
        holder = self._byod("readLock", {})
        left = ""
        if isinstance(holder, dict) and isinstance(holder.get("expiresAt"), int | float):
            left = f" for {max(0.0, holder['expiresAt'] / 1000 - time.time()):.0f} s more"
        raise BusyError(
            f"the deployment {self.where} is locked by another runner{left}"
            + (": this run's hold expired and was taken over" if lost else "")
        )

    def _forget(self) -> None:
        """Drop what was read under a lock no longer held."""
        self._locked_stamp = None
        self._locked_progress = None

    def remaining(self, deadline: float | None) -> float | None:
        """Seconds left before ``deadline`` (None: no deadline), or
        :class:`InstanceTimeoutError` when it has passed."""
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise InstanceTimeoutError(f"the deployment {self.where}: the step's time is up")
        return left

    def _byod(self, name: str, args: dict[str, Any], *, timeout: float | None = None) -> Any:
        """Call byod's own function ``name``; its refusals become byod's errors."""
        try:
            return self.client.function(f"{MODULE}:{name}", args, timeout=timeout)
        except FunctionError as exc:
            self._refused(name, exc)

    def _refused(self, name: str, exc: FunctionError) -> NoReturn:
        code = exc.code
        message = exc.message
        if isinstance(exc.data, dict) and isinstance(exc.data.get("message"), str):
            message = self.client.scrub(str(exc.data["message"])).removeprefix("byod: ")
        if code == "BYOD_DRIFT":
            raise DriftError(f"{self.where}: {message}") from None
        if code == "BYOD_LOCK_LOST":
            self._held_until = 0.0
            self._forget()
            raise BusyError(
                f"{self.where}: this run's hold of the deployment's lock expired and another "
                "runner took it; nothing more was written"
            ) from None
        if code in ("BYOD_PAGE_FAILED", "BYOD_BAD_PAGE", "BYOD_BAD_ARGUMENT"):
            raise MigrationFailedError(message) from None
        if _NOT_FOUND in exc.message:
            raise DeployError(
                f"{self.where}: byod's module is not deployed there (byod:{name} is missing): "
                "add it to the app with `byod convex init`, then deploy",
                hint="Run `byod convex init APP_DIR`, add byodTables to schema.ts, deploy.",
            ) from None
        raise MigrationFailedError(f"byod:{name}: {exc.message}") from None
