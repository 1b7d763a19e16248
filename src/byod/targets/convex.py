"""Convex deployments: a user's deployment reached over Convex's HTTP API with its deploy
key, through byod's module in the app (``convex/byod.ts``).

The deployment keeps its own record, as a SQL instance does: the stamp
(``byod_schema_stamp``), the lock (``byod_lock``, an owner and an expiry, taken in a
Convex mutation: a real lock) and a phased step's progress (``byod_schema_progress``).
What is different, and what this target promises instead:

* A step's ``up`` is the migration's calls to the deployment's functions
  (``ctx.convex``), each its own Convex transaction, not one transaction for the step: the
  stamp is written only after the whole ``up`` returned, so a step that stopped halfway is
  run again whole on the next run (write ``up`` so that running it twice is harmless).
* A backfill batch is ONE Convex mutation (``byod:runBatch``) that runs the app's page
  mutation and moves the cursor: each batch is applied exactly once, whatever happens
  to byod between two batches.
* Every write of byod's module names the lock's owner; a runner whose hold expired is
  refused there (``BYOD_LOCK_LOST``) and reports busy, never writes over another runner.
  The hold lasts ``hold_seconds`` and is renewed before any call once half of it is gone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit

from sqlalchemy.engine import URL

from byod.errors import (
    BusyError,
    ByodError,
    DeployError,
    DriftError,
    InstanceTimeoutError,
    MigrationFailedError,
    RehearsalError,
    TransactionLimitError,
    UnreachableError,
)
from byod.instance_url import InstancePolicy, resolve_instance_host
from byod.registry import Backfill, Migration, Step
from byod.targets.backfill import Batch, Progress
from byod.targets.base import (
    BatchBody,
    Phase,
    StampEntry,
    StepBody,
    check_position,
    progress_key,
    started,
)
from byod.targets.convex_client import ConvexClient, FunctionError
from byod.targets.convex_code import WORKTREE, AppCode, check_convex_version
from byod.targets.convex_deploy import Deploy

__all__ = ["ConvexTarget", "DeploymentCalls", "open_convex"]

_MODULE = "byod"

FunctionKind = Literal["query", "mutation", "action"]
#: A function stopped by a transaction limit: convex-test's words ("Read too much data
#: in a single function execution (limit: …)", "Scanned too many documents …", "Wrote too
#: much data …", "Wrote too many documents …"; convex-test 0.0.60,
#: dist/transactionMetrics.js, which copies the backend's phrase). The real backend's
#: source is not on this machine to cite: its limit errors are matched by that same
#: phrase and by the TooMany* error codes as remembered, not checked against it.
_TRANSACTION_LIMIT = re.compile(
    r"in a single function execution|\bTooMany(?:Reads|Writes|BytesRead|BytesWritten|"
    r"DocumentsRead|DocumentsWritten)\b"
)
_UNSET = object()
_NOT_FOUND = "Could not find"


def open_convex(
    base_url: str,
    deploy_key: str,
    *,
    timeout: float,
    hold_seconds: float = 30.0,
    policy: InstancePolicy | None = None,
    ssl_ca: str | None = None,
    deploy: Deploy | None = None,
) -> ConvexTarget:
    """A target for the deployment at ``base_url`` (checked by the instance URL policy).

    The host's addresses are resolved first and a host that resolves to a loopback,
    private or link-local address the ``policy`` does not allow is refused
    (:class:`SettingsError`), so a tenant's public-looking name cannot send the deploy key
    inside the operator's network; every call then goes to the address checked (the name
    kept for ``Host`` and the TLS certificate), so a second DNS answer cannot move it.
    Nothing is called yet: the first call (reading the stamp) shows whether the
    deployment answers.
    """
    policy = policy or InstancePolicy()
    address = None if policy.allow_private else _checked_address(base_url, policy)
    client = ConvexClient(
        base_url,
        deploy_key,
        timeout=max(timeout, 1.0),
        connect_timeout=timeout,
        ssl_ca=None if ssl_ca == "system" else ssl_ca,
        address=address,
    )
    return ConvexTarget(client, deploy_key, hold_seconds=hold_seconds, deploy=deploy)


def _checked_address(base_url: str, policy: InstancePolicy) -> str:
    """The one address the deployment's host resolves to, checked by the policy: every
    call connects there (the name only in ``Host`` and TLS), never to a second answer."""
    parts = urlsplit(base_url.removeprefix("convex+"))
    url = URL.create("convex", host=parts.hostname or "", port=443)
    try:
        return resolve_instance_host(url, policy)
    except UnreachableError:
        raise UnreachableError(
            f"the Convex deployment {base_url} is unreachable: its host does not resolve"
        ) from None


class DeploymentCalls:
    """A Convex deployment's functions for migrations (``ctx.app``: the app's own
    deployment), called with its deploy key, each through the endpoint of its kind
    (``/api/query``, ``/api/mutation``, ``/api/action``; the key lets internal functions
    answer there too): the deployment refuses a call whose function is of another kind,
    so a "query" can never write. A function that throws fails the step."""

    def __init__(self, client: ConvexClient) -> None:
        self.client = client

    def query(self, path: str, args: Mapping[str, Any] | None = None) -> Any:
        """See :class:`byod.registry.FunctionCalls`."""
        return self._call("query", path, args)

    def mutation(self, path: str, args: Mapping[str, Any] | None = None) -> Any:
        """See :class:`byod.registry.FunctionCalls`."""
        return self._call("mutation", path, args)

    def action(self, path: str, args: Mapping[str, Any] | None = None) -> Any:
        """See :class:`byod.registry.FunctionCalls`."""
        return self._call("action", path, args)

    def _call(self, kind: FunctionKind, path: str, args: Mapping[str, Any] | None) -> Any:
        call = getattr(self.client, kind)
        try:
            return call(path, dict(args or {}), timeout=self._timeout())
        except FunctionError as exc:
            raise MigrationFailedError(exc.message) from None

    def _timeout(self) -> float | None:
        return None


class _Calls(DeploymentCalls):
    """``ctx.convex``: the user's deployment's functions for a migration, each call
    bounded by what is left of the step's deadline and made under the target's lock."""

    def __init__(self, target: ConvexTarget, deadline: float | None) -> None:
        super().__init__(target.client)
        self._target = target
        self._deadline = deadline

    def _call(self, kind: FunctionKind, path: str, args: Mapping[str, Any] | None) -> Any:
        if not isinstance(path, str) or path.startswith(f"{_MODULE}:"):
            raise MigrationFailedError(
                f"a migration calls the app's functions, not byod's own ({path!r})"
            )
        self._target.hold()
        return super()._call(kind, path, args)

    def _timeout(self) -> float | None:
        return self._target.remaining(self._deadline)


class ConvexTarget:
    """One user's Convex deployment; see :class:`byod.targets.base.Target`."""

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
        self._app_code: object = _UNSET
        #: the app commit the deployment runs, as its module says (None: unknown)
        self._code_ref: object = _UNSET
        #: the stamp as read while holding the lock, kept up to date by this target's
        #: own writes (nobody else writes it while the lock is held); None: read it
        self._locked_stamp: list[StampEntry] | None = None
        #: the steps in progress, read and kept the same way
        self._locked_progress: dict[str, Progress] | None = None

    def __enter__(self) -> ConvexTarget:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- what the runner asks ----------------------------------------------------------

    def holds_control_plane(self, control_plane_id: str) -> bool:
        """Never: byod's control plane is a SQL database."""
        return False

    def defer_control_plane_check(self, control_plane_id: str) -> bool:
        """Nothing to defer: :meth:`holds_control_plane` asks nothing."""
        return False

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
        if self._app_code is _UNSET:
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
        if self._code_ref is _UNSET:
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

    def read_stamp(self) -> list[StampEntry]:
        """See :meth:`byod.targets.base.Target.read_stamp`."""
        rows = self._byod("readStamp", {})
        try:
            return [
                StampEntry(
                    id=str(row["id"]),
                    version=int(row["version"]),
                    checksum=str(row["checksum"]),
                    applied_at=datetime.fromtimestamp(row["appliedAt"] / 1000, UTC).replace(
                        tzinfo=None
                    ),
                )
                for row in rows
            ]
        except (TypeError, KeyError, ValueError) as exc:
            raise DriftError(
                f"the stamp of {self.where} is not byod's (byod:readStamp answered "
                f"{type(exc).__name__}): check the app's convex/byod.ts is byod's module"
            ) from None

    def rehearse(self, deadline: float | None = None) -> list[StampEntry]:
        """Never: a deployment's functions commit each call; nothing can be rolled back."""
        raise RehearsalError(
            "Convex deployments cannot be rehearsed: each function call commits on its own"
        )

    def begin(self, deadline: float | None = None) -> list[StampEntry]:
        """See :meth:`byod.targets.base.Target.begin`: the stamp, read without the lock
        (taken by the first step, which reads the stamp once under it)."""
        return self.read_stamp()

    def apply(
        self, step: Step, body: StepBody, deadline: float | None = None, phase: Phase = "whole"
    ) -> bool:
        """See :meth:`byod.targets.base.Target.apply`: the lock is held, the stamp
        re-read, ``body`` run, and only then the stamp (or the progress) written."""
        migration = step.migration
        self.hold()
        self._code_for(step)
        if self._locked_stamp is None:
            self._locked_stamp = self.read_stamp()
        if not check_position(step, self._locked_stamp):
            return False
        if phase == "schema" and started(step, list(self._progress_under_lock())):
            return False
        self._run_body(step, body, deadline)
        if deadline is not None and time.monotonic() > deadline:
            raise InstanceTimeoutError(f"{migration.id} ran past the timeout")
        self.hold()
        owner = {"owner": self.owner}
        key = progress_key(step)
        if phase == "schema":
            row = self._byod(
                "startProgress",
                {"migration": key, "rowsTotal": None, "checksum": migration.checksum} | owner,
            )
            self._progress_under_lock()[key] = _progress(row)
        elif phase == "finalize":
            ending: dict[str, Any] = {
                "migration": key,
                "backfills": len(migration.backfills_for(step.direction)),
            }
            if step.direction == "up":
                ending["stamp"] = {"version": migration.version, "checksum": migration.checksum}
            else:
                ending["unstamp"] = migration.id
            self._byod("finishProgress", ending | owner)
            self._stamped(step)
            self._progress_under_lock().pop(key, None)
        elif step.direction == "up":
            self._byod(
                "recordStep",
                {"id": migration.id, "version": migration.version, "checksum": migration.checksum}
                | owner,
            )
            self._stamped(step)
        elif self._byod("removeStamp", {"id": migration.id} | owner):
            self._stamped(step)
        else:
            raise DriftError(f"the stamp of {migration.id} vanished while it was rolled back")
        return True

    def _code_for(self, step: Step) -> None:
        """With the app in git: the deployment runs the code of ``step``'s commit."""
        code = self._code()
        if code is not None:
            self._run_on(code.ref_for(step.migration))

    def _stamped(self, step: Step) -> None:
        """Keep the stamp read under the lock as this target's write left it."""
        if self._locked_stamp is None:
            return
        migration = step.migration
        kept = [entry for entry in self._locked_stamp if entry.id != migration.id]
        if step.direction == "up":
            now = datetime.now(UTC).replace(tzinfo=None)
            kept.append(StampEntry(migration.id, migration.version, migration.checksum, now))
        self._locked_stamp = sorted(kept, key=lambda entry: entry.version)

    def read_progress(self, step: Step) -> Progress | None:
        """See :meth:`byod.targets.base.Target.read_progress`; read under the lock (taken
        here: the step's work follows), and kept as this target's writes move it."""
        self.hold()
        return self._progress_under_lock().get(progress_key(step))

    def in_progress(self) -> list[str]:
        """See :meth:`byod.targets.base.Target.in_progress` (read without the lock)."""
        return [str(row["migration"]) for row in self._byod("listProgress", {})]

    def _progress_under_lock(self) -> dict[str, Progress]:
        if self._locked_progress is None:
            rows = self._byod("listProgress", {})
            self._locked_progress = {str(row["migration"]): _progress(row) for row in rows}
        return self._locked_progress

    def apply_batch(
        self,
        step: Step,
        at: Progress,
        work: Backfill,
        batch_size: int,
        body: BatchBody,
        deadline: float | None = None,
    ) -> Batch:
        """See :meth:`byod.targets.base.Target.apply_batch`: one ``byod:runBatch``
        mutation runs the backfill's page mutation and moves the cursor together."""
        if work.page is None:
            raise MigrationFailedError(
                f"{step.migration.id}: the backfill of {work.table} is a SQL one (key= and "
                "apply=), but this instance is a Convex deployment: give page= (the app's "
                "page mutation) instead"
            )
        self.hold()
        self._code_for(step)
        try:
            answer = self._byod(
                "runBatch",
                {
                    "migration": progress_key(step),
                    "backfill": at.backfill,
                    "page": work.page,
                    "cursor": at.last_key,
                    "expectedRowsDone": at.rows_done,
                    "numItems": batch_size,
                    "owner": self.owner,
                },
                timeout=self.remaining(deadline),
            )
        except MigrationFailedError as exc:
            if _TRANSACTION_LIMIT.search(exc.message):
                raise TransactionLimitError(exc.message) from None
            raise
        progress = _progress(answer["progress"])
        self._progress_under_lock()[progress_key(step)] = progress
        return Batch(
            rows=int(answer["rows"]),
            first_key=at.last_key,
            last_key=progress.last_key,
            finished=bool(answer["isDone"]),
            progress=progress,
        )

    def clear_dirty(self) -> list[str]:
        """Nothing to clear: a Convex step never leaves a dirty marker (a step that
        stopped halfway is run again whole)."""
        return []

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

    # -- the lock --------------------------------------------------------------------

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

    # -- calls -----------------------------------------------------------------------

    def _run_body(self, step: Step, body: StepBody, deadline: float | None) -> None:
        try:
            body(_Calls(self, deadline))
        except FunctionError as exc:  # the app's function threw: the step failed
            raise MigrationFailedError(exc.message) from None
        except ByodError:
            raise
        except Exception as exc:
            text = str(exc).strip()
            raise MigrationFailedError(
                self.client.scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
            ) from exc

    def _byod(self, name: str, args: dict[str, Any], *, timeout: float | None = None) -> Any:
        """Call byod's own function ``name``; its refusals become byod's errors."""
        try:
            return self.client.function(f"{_MODULE}:{name}", args, timeout=timeout)
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


def _local(base_url: str) -> bool:
    """Whether a deployment's URL names this machine (a loopback address or localhost)."""
    host = (urlsplit(base_url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _progress(row: Mapping[str, Any]) -> Progress:
    total = row.get("rowsTotal")
    checksum = row.get("checksum")
    return Progress(
        backfill=int(row["backfill"]),
        last_key=row.get("cursor"),
        rows_done=int(row["rowsDone"]),
        rows_total=None if total is None else int(total),
        checksum=checksum if isinstance(checksum, str) and checksum else None,
    )
