"""The one exception hierarchy of byod.

Every error byod raises on purpose is a :class:`ByodError`. Each class says, in its
docstring, what happened and what the operator should do; its message never holds a
secret (URL password, deploy key, encryption key); its ``exit_code`` is what the command
line returns (1: something failed, 2: bad usage or input). The command line catches them
once, at its edge.

* ByodError
  x InputError (exit 2)
    + SettingsError
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
    """The command was given something it cannot use: fix the input and run it again."""

    exit_code = 2
    hint = "Fix the input the message names (`byod COMMAND --help` lists the options)."


class RehearsalError(InputError):
    """A rehearsal was asked of instances that cannot roll a migration back (MySQL and
    MariaDB, whose DDL commits on its own; Convex deployments): nothing was touched."""

    hint = "Rehearse only SQLite and PostgreSQL users (select them with --users)."


class SettingsError(InputError):
    """A setting (flag or BYOD_* variable) is missing or malformed: correct it."""

    hint = "Correct the setting the message names (see docs/reference/settings.md)."


class RegistryError(InputError):
    """The migrations folder is broken: fix the file the message names."""

    hint = "Fix the named migration file, then run the command again."


class UnknownUserError(InputError):
    """No user has that id or clerk id: check `byod users list` or add the user."""

    hint = "Check the id, or add the user with `byod users add --clerk-id ID`."


class NotConnectedError(InputError):
    """The user has no database configured: run `byod connect USER --url URL` first."""

    hint = "Connect the user's database with `byod connect USER --url URL`."


class IrreversibleError(InputError):
    """A rollback would need a migration that has no `down`: nothing was touched."""

    hint = "Write a `down` for that migration, or roll back to a later version."


class PlanError(InputError):
    """The requested target version makes no plan (unknown, or on the wrong side): pick a
    version between 0 and head, above the user's for migrate, below it for rollback."""

    hint = "Pick a version between 0 and head (`byod pending USER`, `byod plan USER`)."


class CredentialsError(ByodError):
    """Sealed credentials do not open: wrong or missing key, or a corrupt or moved ciphertext."""

    hint = (
        "Check BYOD_ENCRYPTION_KEY is the key the credentials were sealed with; "
        "if it is, reconnect the user with `byod connect`."
    )


class ControlPlaneError(ByodError):
    """The control-plane database cannot be used: check BYOD_DATABASE_URL and run `byod init`."""

    hint = "Check BYOD_DATABASE_URL points at a reachable database and run `byod init`."


class BrokerError(ByodError):
    """The task queue's broker cannot be reached: nothing was handed out."""

    hint = "Check BYOD_BROKER_URL points at a running Redis or RabbitMQ server."


class AccessError(ByodError):
    """The HTTP service refused the caller (the status code says why): fix the request or
    the token, as the detail says."""


class AuthError(AccessError):
    """The request carries no valid token: sign in again."""


class ForbiddenError(AccessError):
    """The caller may not do this (operators only): use an operator's token."""


class NotFoundError(AccessError):
    """No such resource, or not the caller's: check the id in the path."""


class UnavailableError(ByodError):
    """This server is not set up for that (e.g. distributed runs without a broker): ask
    its operator, or try again later."""


class KeysUnavailableError(UnavailableError):
    """The token-signing keys (the JWKS URL) cannot be fetched now: try again later."""


class InstanceError(ByodError):
    """Something went wrong on a user's own database instance: its subclass says what,
    and ``byod history USER`` shows it."""


class UnreachableError(InstanceError):
    """The instance did not answer: it is marked `error` and the user is notified; retry later."""

    transient = True
    hint = "Check the instance is up and its URL is right; the next run retries it."


class BusyError(InstanceError):
    """Another runner holds this user's lease or the instance lock: wait and run again."""

    transient = True
    hint = "Another run is working on this user; wait for it (or its lease to expire)."


class InstanceTimeoutError(InstanceError):
    """An instance transaction (a step, a backfill batch) or a connect took longer than its
    timeout: that transaction was rolled back; retry later."""

    transient = True
    hint = "Raise --timeout, or move a large data change into a backfill (batches)."


class InstanceAuthError(InstanceError):
    """The instance refused byod's credentials (a Convex deployment answered 401 or 403 to
    the deploy key): the key is wrong, revoked, or for another deployment. Nothing ran."""

    hint = (
        "Create a deploy key for this deployment (Convex dashboard, Settings) and connect "
        "the user again with it."
    )


class DeployError(InstanceError):
    """The app's schema and functions did not reach the user's Convex deployment (its
    deploy command failed, or byod's module is missing there): no migration ran on it."""

    hint = (
        "The message (also in `byod history USER`) says what failed: fix the app or the "
        "command (BYOD_CONVEX_DEPLOY), then run `byod migrate` again."
    )


class MigrationFailedError(InstanceError):
    """A migration raised: its instance changes were rolled back, later ones skipped."""

    hint = "Fix the migration (or the data it trips over), then run `byod migrate` again."


class TransactionLimitError(MigrationFailedError):
    """A backfill page went past what the instance allows one transaction (Convex: 16 MiB
    read or written, 32,000 documents scanned, 16,000 written): nothing of it was kept,
    and byod tried it again smaller, down to one document a page, before giving up."""

    hint = (
        "One document alone is past the limit, or the page mutation reads far more than its "
        "page (an unbounded query inside it): bound what it reads, then run again."
    )


class DriftError(InstanceError):
    """An applied migration no longer matches its file (or is unknown): nothing was run."""

    hint = (
        "Restore the migration file as it was applied (run `byod verify` for details); "
        "never edit a migration that is already applied, add a new one instead."
    )


class DirtyInstanceError(InstanceError):
    """A non-transactional migration failed halfway: repair the instance by hand first."""

    hint = (
        "Undo the half-applied change on the instance by hand, then run `byod repair USER` "
        "and migrate again."
    )


class StoppedError(InstanceError):
    """The run was stopped (Ctrl-C) between two batches of a backfill: each batch done is
    kept with its cursor; the next run resumes the step there."""

    hint = "Run `byod migrate` again: the step resumes at its cursor."
