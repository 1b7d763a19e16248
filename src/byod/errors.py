"""The one exception hierarchy of byod.

Every error byod raises on purpose is a :class:`ByodError`. Each class says, in its
docstring, what happened and what the operator should do; its message never holds a
secret (URL password, deploy key, encryption key); its ``exit_code`` is what the command
line returns (1: something failed, 2: bad usage or input). The command line catches them
once, at its edge.

* ByodError
  x InputError (exit 2)
    + SettingsError
      + MissingExtraError
    + RegistryError
    + UnknownUserError
    + NotConnectedError
    + IrreversibleError
    + PlanError
  x CredentialsError
  x ControlPlaneError
  x BrokerError
  x AccessError             (the HTTP service's answers to a caller)
    + AuthError             (401)
    + ForbiddenError        (403)
    + NotFoundError         (404)
  x UnavailableError        (503: this server is not set up for it)
    + KeysUnavailableError
  x InstanceError
    + UnreachableError      (transient)
    + BusyError             (transient)
    + InstanceTimeoutError  (transient)
    + InstanceAuthError
    + MigrationFailedError
      + TransactionLimitError
    + DriftError
    + DirtyInstanceError
    + StoppedError
"""

from __future__ import annotations

from byod.text import printable

__all__ = [
    "AccessError",
    "AuthError",
    "BrokerError",
    "BusyError",
    "ByodError",
    "ControlPlaneError",
    "CredentialsError",
    "DeployError",
    "DirtyInstanceError",
    "DriftError",
    "ForbiddenError",
    "InputError",
    "InstanceAuthError",
    "InstanceError",
    "InstanceTimeoutError",
    "IrreversibleError",
    "KeysUnavailableError",
    "MigrationFailedError",
    "MissingExtraError",
    "NotConnectedError",
    "NotFoundError",
    "PlanError",
    "RegistryError",
    "RehearsalError",
    "SettingsError",
    "StoppedError",
    "TransactionLimitError",
    "UnavailableError",
    "UnknownUserError",
    "UnreachableError",
]


class ByodError(Exception):
    """Something byod could not do; the message says what and what to do next."""

    exit_code: int = 1
    #: A transient error may succeed if tried again later (unreachable, busy).
    transient: bool = False
    #: What the operator should do, shown under the message.
    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        # text from outside (a driver's message, a clerk id) can hold escape codes:
        # escaped here, so no log, ledger row or terminal ever receives them raw
        message = printable(message)
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = printable(hint)

    def __str__(self) -> str:
        return self.message


class InputError(ByodError):
    """The command was given something it cannot use: a clerk id `users add` refuses, a
    fleet-only flag given for one `USER`, an unknown run id, a `byod new` name that
    makes no file.

    What to do: fix what the message names (`byod COMMAND --help`)."""

    exit_code = 2
    hint = "Fix the input the message names (`byod COMMAND --help` lists the options)."


class RehearsalError(InputError):
    """A rehearsal was asked of instances that cannot roll a migration back (MySQL/MariaDB,
    Convex; the message names the users); nothing was touched.

    What to do: select SQLite and PostgreSQL users only (`--users`), or
    `--rehearse-skip-unsupported`."""

    hint = "Rehearse only SQLite and PostgreSQL users (select them with --users)."


class SettingsError(InputError):
    """A setting is missing or malformed (key, URL, unsupported database kind, a control
    plane that is not SQLite or PostgreSQL, a log file that cannot be written, no
    broker for `--distributed`, a SQLite control plane for distributed runs, a bad
    `BYOD_INSTANCE_NETWORKS`); or an instance URL is refused (an option of
    [Security](../how-to/security.md)'s list, a PostgreSQL URL without a user, a
    `sqlite` instance with `BYOD_ALLOW_SQLITE_INSTANCES=0`, a host at an internal
    address — see [Instance networks](../how-to/security.md#instance-networks) — a
    Convex URL on `http` without `BYOD_ALLOW_PRIVATE_INSTANCES=1`, a Convex
    deployment without its deploy key, the control plane itself): at `connect`
    nothing is stored, in a run that user fails (the run exits 1) with status
    `error`, nothing touched.

    What to do: correct it; allow the network (`BYOD_INSTANCE_NETWORKS`) or reconnect
    the user with an allowed URL; `byod verify --policy` lists the configs refused."""

    hint = "Correct the setting the message names (see docs/reference/settings.md)."


class MissingExtraError(SettingsError):
    """The command needs optional packages that are not installed: the message names the
    extra that brings them (`postgres` for PostgreSQL instances and control planes,
    `mysql` for MySQL and MariaDB, `serve` for `byod serve`, `celery` for `byod worker`
    and `--broker`). Nothing was started or stored; in a run, each user whose instance
    needs it fails with status `error`, nothing touched.

    What to do: run the `pip install "byod[...]"` the message gives (or `byod[all]`),
    in the environment byod is installed in, and run the command again."""

    def __init__(self, extra: str, module: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs byod's {extra!r} extra ({module} is not installed)",
            hint=f'pip install "byod[{extra}]" (or "byod[all]"), then run it again',
        )
        self.extra = extra


class RegistryError(InputError):
    """The migrations folder is broken (the message names the file: bad name, a folder
    named like a migration, a syntax or import error, a file that calls `sys.exit`
    while loading, a gap or duplicate).

    What to do: fix that file."""

    hint = "Fix the named migration file, then run the command again."


class UnknownUserError(InputError):
    """No user has that id (a `USER` of ASCII digits) or that exact clerk id (anything
    else).

    What to do: check `byod users list`."""

    hint = "Check the id, or add the user with `byod users add --clerk-id ID`."


class NotConnectedError(InputError):
    """The user has no database configured (or is disconnected).

    What to do: `byod connect USER --url URL`."""

    hint = "Connect the user's database with `byod connect USER --url URL`."


class IrreversibleError(InputError):
    """A rollback would cross a migration without `down`; nothing was touched.

    What to do: roll back to a later version, or write a `down`."""

    hint = "Write a `down` for that migration, or roll back to a later version."


class PlanError(InputError):
    """The target version is unknown or on the wrong side.

    What to do: pick a version between 0 and head."""

    hint = "Pick a version between 0 and head (`byod pending USER`, `byod plan USER`)."


class CredentialsError(ByodError):
    """Sealed credentials do not open: wrong key (a fleet run whose key opens none of its
    users stops before it starts; a user's status is never set to `error` for a key
    mismatch), or a corrupt or moved ciphertext (the instance is marked `error`).

    What to do: set the key they were sealed with; otherwise `byod connect` the user
    again."""

    hint = (
        "Check BYOD_ENCRYPTION_KEY is the key the credentials were sealed with; "
        "if it is, reconnect the user with `byod connect`."
    )


class ControlPlaneError(ByodError):
    """The control plane is unreachable or not initialised (or made by an older byod: `byod
    init` adds the new columns); during a fleet run a short outage is waited for,
    and only a user that waited longer than half its lease fails with it.

    What to do: check `BYOD_DATABASE_URL`, run `byod init`."""

    hint = "Check BYOD_DATABASE_URL points at a reachable database and run `byod init`."


class BrokerError(ByodError):
    """The task-queue broker does not answer; nothing was recorded or handed out.

    What to do: check `BYOD_BROKER_URL` and that Redis / RabbitMQ runs."""

    hint = "Check BYOD_BROKER_URL points at a running Redis or RabbitMQ server."


class AccessError(ByodError):
    """The HTTP service refused the caller (the status code says why): fix the request or
    the token, as the detail says."""


class AuthError(AccessError):
    """The request carries no valid token (missing, expired, wrong key or algorithm).

    What to do: sign in again; check the token's issuer, audience and expiry."""


class ForbiddenError(AccessError):
    """The caller may not do this (operators only).

    What to do: use an operator's token (the role claim, `byod_role: admin` by default)."""


class NotFoundError(AccessError):
    """No such resource, or not the caller's (worded the same, so it says nothing of
    others).

    What to do: check the id in the path."""


class UnavailableError(ByodError):
    """This server is not set up for that (distributed runs without a broker or on a SQLite
    control plane) or the control plane does not answer.

    What to do: ask its operator, or try again later."""


class KeysUnavailableError(UnavailableError):
    """The token-signing keys (the JWKS URL) cannot be fetched now; tokens are never let
    through unchecked.

    What to do: try again later; check `BYOD_JWT_JWKS` and `BYOD_JWT_JWKS_CA`."""


class InstanceError(ByodError):
    """Something went wrong on a user's own database instance: its subclass says what,
    and ``byod history USER`` shows it."""


class UnreachableError(InstanceError):
    """The instance did not answer (or the connection dropped); config `error`, user
    notified.

    What to do: check the instance is up and the URL right; the next run retries it;
    `byod connect` to change the URL."""

    transient = True
    hint = "Check the instance is up and its URL is right; the next run retries it."


class BusyError(InstanceError):
    """Another runner holds the user's lease or the instance lock, or the instance's server
    refused the connection for want of a free slot (its connection limit; the
    instance is not marked unreachable); transient: retried with `--retries`, and a
    fleet run counts the user `busy`, not failed.

    What to do: wait for it; a dead runner's lease expires on its own within
    `--lease-seconds` (30 s); for a full server, a lower `--concurrency` or a higher
    connection limit."""

    transient = True
    hint = "Another run is working on this user; wait for it (or its lease to expire)."


class InstanceTimeoutError(InstanceError):
    """One instance transaction (a step, a backfill batch, a finalize) passed `--timeout`
    (on PostgreSQL and MariaDB the server stopped the statement), or a Convex call
    got no answer in time; that transaction was rolled back (a *connect* that times
    out is `UnreachableError`).

    What to do: raise `--timeout`, or move a large data change into a backfill;
    transient: retried with `--retries`."""

    transient = True
    hint = "Raise --timeout, or move a large data change into a backfill (batches)."


class InstanceAuthError(InstanceError):
    """A Convex deployment refused the deploy key (HTTP 401/403): wrong, revoked, or
    another deployment's key; nothing ran.

    What to do: create a deploy key for that deployment and connect the user again with
    it."""

    hint = (
        "Create a deploy key for this deployment (Convex dashboard, Settings) and connect "
        "the user again with it."
    )


class DeployError(InstanceError):
    """The app's deploy command failed for a Convex deployment (three tries; once for a
    command that cannot be run), or byod's module is still missing there after a
    deploy: no migration ran on it.

    What to do: the message (and `byod history USER`) holds the command's last output
    lines; fix the app or `BYOD_CONVEX_DEPLOY`; `byod convex init` for a missing
    module; migrate again."""

    hint = (
        "The message (also in `byod history USER`) says what failed: fix the app or the "
        "command (BYOD_CONVEX_DEPLOY), then run `byod migrate` again."
    )


class MigrationFailedError(InstanceError):
    """A migration raised; its instance changes were rolled back, later steps `skipped`.

    What to do: fix the migration or the data it trips over (`byod history USER` shows
    the error), run `byod migrate` again."""

    hint = "Fix the migration (or the data it trips over), then run `byod migrate` again."


class TransactionLimitError(MigrationFailedError):
    """A Convex backfill page went past the deployment's limits for one transaction (16 MiB
    read or written, 32,000 documents scanned, 16,000 written) even at one document
    a page (byod halves a page that hits them, cursor unchanged, and grows it back
    after pages pass; `history` shows the sizes used).

    What to do: bound what the page mutation reads (an unbounded query inside it), then
    run `byod migrate` again."""

    hint = (
        "One document alone is past the limit, or the page mutation reads far more than its "
        "page (an unbounded query inside it): bound what it reads, then run again."
    )


class DriftError(InstanceError):
    """An applied migration's file changed, or the instance has a migration the folder
    lacks, applied or in progress (a backfill step renamed or replaced halfway); or
    a backfill batch found its cursor moved under it (rolled back) (`plan` and
    `migrate --all` also refuse, before anything runs, when the control plane
    records users above the folder's head).

    What to do: restore the file as applied (`byod verify` shows which), or deploy the
    code that has it."""

    hint = (
        "Restore the migration file as it was applied (run `byod verify` for details); "
        "never edit a migration that is already applied, add a new one instead."
    )


class DirtyInstanceError(InstanceError):
    """A step failed after its DDL on MySQL/MariaDB, whose DDL commits on its own: the
    instance is half-migrated, and refused until repaired.

    What to do: undo the step's changes by hand (`byod history USER` names it), then
    `byod repair USER` and migrate again."""

    hint = (
        "Undo the half-applied change on the instance by hand, then run `byod repair USER` "
        "and migrate again."
    )


class StoppedError(InstanceError):
    """The run was stopped (Ctrl-C, one user or a fleet) between two batches of a backfill;
    each batch done is kept with its cursor.

    What to do: run `byod migrate` again: the step resumes at its cursor."""

    hint = "Run `byod migrate` again: the step resumes at its cursor."
