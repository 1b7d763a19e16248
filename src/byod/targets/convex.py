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

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import URL

from byod.errors import (
    ByodError,
    DriftError,
    InstanceTimeoutError,
    MigrationFailedError,
    RehearsalError,
    TransactionLimitError,
    UnreachableError,
)
from byod.instance_url import InstancePolicy, resolve_instance_host
from byod.registry import Backfill, Step
from byod.targets._convex_app_code import ConvexAppCode
from byod.targets._convex_base import MODULE, TRANSACTION_LIMIT, FunctionKind
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
from byod.targets.convex_deploy import Deploy

__all__ = ["ConvexTarget", "DeploymentCalls", "open_convex"]


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
        if not isinstance(path, str) or path.startswith(f"{MODULE}:"):
            raise MigrationFailedError(
                f"a migration calls the app's functions, not byod's own ({path!r})"
            )
        self._target.hold()
        return super()._call(kind, path, args)

    def _timeout(self) -> float | None:
        return self._target.remaining(self._deadline)


class ConvexTarget(ConvexAppCode):
    """One user's Convex deployment; see :class:`byod.targets.base.Target`."""

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
            if TRANSACTION_LIMIT.search(exc.message):
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
