"""Users, their BYOD configs and the leases on them: the one writer of ``users`` and
``byod_configs`` (:func:`config_at_version` is the statement the ledger runs with a
step's "completed" row, so the two never disagree).

A lease is a time-limited claim on one user's config: claiming it is one conditional
UPDATE ... RETURNING (never read-then-write), so two runners can never both hold it, and
a runner that dies leaves a lease that simply expires.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from byod.clock import utcnow
from byod.controlplane._bulk import (
    ExistingUser,
    NewConfig,
    existing_users,
    insert_users,
    write_configs,
)
from byod.controlplane._leases import LeaseKeeper
from byod.controlplane._pages import among
from byod.controlplane._tx import reading, single, writing
from byod.controlplane.schema import configs, ledger, users
from byod.errors import (
    BusyError,
    InputError,
    NotConnectedError,
    UnknownUserError,
)
from byod.redact import mask
from byod.text import MAX_CLERK_ID, clerk_id_problem, has_control

__all__ = ["Config", "Directory", "User", "config_at_version"]

log = logging.getLogger("byod.runner")


#: What a removed user's clerk id becomes (with its byod id after it): a control
#: character first, so no clerk id can be registered as it, nor a token's subject match it.
_TOMBSTONE = "\x1fremoved:"


@dataclass(frozen=True)
class User:
    """An app user: ``id`` is byod's, ``clerk_id`` the external auth subject."""

    id: int
    clerk_id: str
    email: str | None = None
    created_at: datetime | None = None
    #: when the user was removed (``byod users remove``); None for a current user
    removed_at: datetime | None = None


@dataclass(frozen=True)
class Config:
    """A user's BYOD config as stored (credentials still sealed).

    ``open_rows`` is only filled in by :meth:`Directory.claim_lease`: how many ledger rows
    of this user a lost runner left ``pending`` or ``running``.
    """

    user_id: int
    target_kind: str
    sealed_url: str
    sealed_secret: str | None
    key_id: str
    connection_status: str
    schema_version: int
    last_error: str | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    updated_at: datetime
    queue: str | None = None
    open_rows: int = 0


#: The largest id an ``INTEGER`` column holds on every control plane (PostgreSQL's int4).
_MAX_ID = 2**31 - 1

_CONFIG_COLUMNS = [
    getattr(configs.c, name) for name in Config.__dataclass_fields__ if name != "open_rows"
]


_open_rows = (
    sa.select(sa.func.count())
    # bound, not correlated: SQLite renders an UPDATE's RETURNING unqualified, where
    # "user_id = user_id" would be true of every row
    .where(
        ledger.c.user_id == sa.bindparam("b_user", type_=sa.Integer),
        ledger.c.status.in_(("pending", "running")),
    )
    .scalar_subquery()
)


# Built once, values bound per call: claiming is on every user's path.
_CLAIM = (
    configs.update()
    .where(
        configs.c.user_id == sa.bindparam("b_user", type_=sa.Integer),
        sa.or_(
            configs.c.lease_owner.is_(None),
            configs.c.lease_owner == sa.bindparam("b_owner", type_=sa.String),
            configs.c.lease_expires_at < sa.bindparam("b_now", type_=sa.DateTime),
        ),
    )
    .values(
        lease_owner=sa.bindparam("b_owner", type_=sa.String),
        lease_expires_at=sa.bindparam("b_expires", type_=sa.DateTime),
    )
    .returning(*_CONFIG_COLUMNS, _open_rows.label("open_rows"))
)


def _config(row: sa.Row[tuple[object, ...]]) -> Config:
    return Config(**row._asdict())


class Directory:
    """Reads and writes ``users`` and ``byod_configs``, and holds leases."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._keeper = LeaseKeeper(self.renew_lease)

    # -- users ---------------------------------------------------------------------------

    def add_user(self, clerk_id: str, email: str | None = None) -> User:
        """Create a user; the clerk id is stored exactly as given.

        Raises :class:`InputError` for a clerk id that is taken, or that could not be
        matched exactly (see :func:`byod.text.clerk_id_problem`): all digits, control
        characters, surrounding spaces. Nothing is trimmed or normalised.
        """
        problem = clerk_id_problem(clerk_id)
        if problem is not None:
            raise InputError(f"{problem}: {clerk_id!r} was not added")
        now = utcnow()
        with writing(self.engine, "add the user") as conn:
            try:
                result = conn.execute(
                    users.insert().values(clerk_id=clerk_id, email=email, created_at=now)
                )
            except IntegrityError as exc:
                raise InputError(f"a user with clerk id {clerk_id!r} already exists") from exc
            user_id = result.inserted_primary_key[0]  # type: ignore[index]
        return User(int(user_id), clerk_id, email, now)

    def find_user(self, ref: str) -> User:
        """The user a ``USER`` argument names, by byod's one rule: ASCII digits only is a
        byod id; anything else is a clerk id, matched exactly (never trimmed).

        Raises :class:`UnknownUserError` when no user matches.
        """
        if ref.isascii() and ref.isdigit():
            if len(ref.lstrip("0")) > len(str(_MAX_ID)):  # too long to be any id
                raise UnknownUserError(f"no user with id {ref[:20]}…")
            return self.get_user(int(ref))
        return self.get_user_by_clerk_id(ref)

    def get_user(self, user_id: int) -> User:
        """The user with this byod id; :class:`UnknownUserError` when there is none."""
        if not 0 < user_id <= _MAX_ID:
            raise UnknownUserError(f"no user with id {user_id}")
        return self._one(users.c.id == user_id, f"no user with id {user_id}")

    def get_user_by_clerk_id(self, clerk_id: str) -> User:
        """The user whose clerk id is exactly ``clerk_id`` (byte for byte); a token's
        subject is looked up only this way. :class:`UnknownUserError` when none is."""
        missing = f"no user with clerk id {clerk_id!r}"
        if not clerk_id or len(clerk_id) > MAX_CLERK_ID or has_control(clerk_id):
            raise UnknownUserError(missing)  # could never have been stored: no query
        return self._one(users.c.clerk_id == clerk_id, missing)

    def _one(self, where: sa.ColumnElement[bool], missing: str) -> User:
        with reading(self.engine, "look up the user") as conn:
            row = conn.execute(sa.select(users).where(where)).first()
        if row is None:
            raise UnknownUserError(missing)
        return User(**row._asdict())

    def configured_user_ids(self) -> list[int]:
        """The byod ids of every user with a config, in order."""
        query = sa.select(configs.c.user_id).order_by(configs.c.user_id)
        with reading(self.engine, "list configured users") as conn:
            return [int(user_id) for user_id in conn.execute(query).scalars()]

    def has_kind(self, kind: str) -> bool:
        """Whether any user's instance is of this kind (``convex``, ``postgresql``...)."""
        query = sa.select(configs.c.user_id).where(configs.c.target_kind == kind).limit(1)
        with reading(self.engine, "look for instances of a kind") as conn:
            return conn.execute(query).first() is not None

    def list_users(self, *, removed: bool = False) -> list[User]:
        """Every user, by id (``removed``: removed users too)."""
        query = sa.select(users).order_by("id")
        if not removed:
            query = query.where(users.c.removed_at.is_(None))
        with reading(self.engine, "list users") as conn:
            return [User(**r._asdict()) for r in conn.execute(query)]

    def existing_users(self, clerk_ids: Sequence[str]) -> dict[str, ExistingUser]:
        """Of ``clerk_ids``, the current users and their sealed configs (bulk import)."""
        with reading(self.engine, "look up the users") as conn:
            return existing_users(conn, clerk_ids)

    def import_page(
        self,
        new_users: Sequence[tuple[str, str | None]],
        configs_for: Callable[[dict[str, int]], list[NewConfig]],
    ) -> None:
        """One transaction: insert ``new_users`` (clerk id, email), then store the
        configs ``configs_for`` builds once it knows their ids (status ``pending``)."""
        with writing(self.engine, "import users") as conn:
            ids = insert_users(conn, new_users)
            write_configs(conn, configs_for(ids))

    def disconnect(self, user_id: int) -> bool:
        """Drop the user's config, its sealed credentials with it (the ledger stays);
        False when there was none. :class:`InputError` while a runner holds its lease."""
        with writing(self.engine, "drop the user's config") as conn:
            return self._drop_config(conn, user_id)

    def remove_user(self, user_id: int) -> User:
        """Remove a user: its config and credentials are dropped, its personal fields
        (email) cleared, its ledger kept under its byod id; its clerk id becomes a
        tombstone no token subject can match (a control character), so the same clerk
        id can be registered again later, as a new user. :class:`InputError` while a
        runner holds its lease."""
        user = self.get_user(user_id)
        if user.removed_at is not None:
            return user
        now = utcnow()
        with writing(self.engine, "remove the user") as conn:
            self._drop_config(conn, user_id)
            conn.execute(
                users.update()
                .where(users.c.id == user_id)
                .values(clerk_id=f"{_TOMBSTONE}{user_id}", email=None, removed_at=now)
            )
        return User(user_id, f"{_TOMBSTONE}{user_id}", None, user.created_at, now)

    def _drop_config(self, conn: sa.Connection, user_id: int) -> bool:
        now = utcnow()
        free = sa.or_(configs.c.lease_owner.is_(None), configs.c.lease_expires_at < now)
        dropped = conn.execute(configs.delete().where(configs.c.user_id == user_id, free)).rowcount
        if dropped:
            return True
        held = conn.execute(sa.select(configs.c.user_id).where(configs.c.user_id == user_id))
        if held.first() is not None:
            raise InputError(
                f"user {user_id} is being migrated (a runner holds its lease): try again "
                "when that run is done"
            )
        return False

    # -- configs -------------------------------------------------------------------------

    def save_config(
        self,
        user_id: int,
        *,
        target_kind: str,
        sealed_url: str,
        sealed_secret: str | None,
        key_id: str,
        queue: str | None = None,
    ) -> None:
        """Store (or replace) a user's sealed credentials; the status becomes ``pending``.

        ``queue``: the task queue whose workers can reach the instance (distributed runs).
        """
        values = {
            "queue": queue,
            "target_kind": target_kind,
            "sealed_url": sealed_url,
            "sealed_secret": sealed_secret,
            "key_id": key_id,
            "connection_status": "pending",
            "last_error": None,
            "updated_at": utcnow(),
        }
        with writing(self.engine, "store the config") as conn:
            updated = conn.execute(
                configs.update().where(configs.c.user_id == user_id).values(**values)
            ).rowcount
            if updated == 0:
                conn.execute(configs.insert().values(user_id=user_id, **values))

    def get_config(self, user_id: int) -> Config:
        """The user's config; :class:`NotConnectedError` when there is none."""
        with reading(self.engine, "read the config") as conn:
            row = conn.execute(
                sa.select(*_CONFIG_COLUMNS).where(configs.c.user_id == user_id)
            ).first()
        if row is None:
            raise NotConnectedError(f"user {user_id} has no database connected")
        return _config(row)

    def set_status(
        self,
        user_id: int,
        status: str,
        *,
        error: str | None = None,
        schema_version: int | None = None,
    ) -> None:
        """Record the outcome of reaching the instance (and, if known, its version)."""
        values: dict[str, object] = {
            "connection_status": status,
            "last_error": None if error is None else mask(error),
            "updated_at": utcnow(),
        }
        if schema_version is not None:
            values["schema_version"] = schema_version
        with single(self.engine, "record the connection status") as conn:
            conn.execute(configs.update().where(configs.c.user_id == user_id).values(**values))

    # -- leases --------------------------------------------------------------------------

    def claim_lease(self, user_id: int, owner: str, seconds: float) -> Config:
        """Claim the user's lease for ``seconds``; returns the config as claimed.

        Raises :class:`BusyError` when another owner holds an unexpired lease and
        :class:`NotConnectedError` when the user has no config.
        """
        for _ in range(3):  # the holder may let go between our UPDATE and our look
            now = utcnow()
            params = {
                "b_user": user_id,
                "b_owner": owner,
                "b_now": now,
                "b_expires": now + timedelta(seconds=seconds),
            }
            with single(self.engine, "claim the lease") as conn:
                row = conn.execute(_CLAIM, params).first()
            if row is not None:
                return _config(row)
            held = self.get_config(user_id)  # raises NotConnectedError when there is none
            if held.lease_owner is not None and held.lease_expires_at is not None:
                raise BusyError(
                    f"user {user_id} is busy: another runner ({held.lease_owner}) holds its "
                    f"lease until {held.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC"
                )
        raise BusyError(f"user {user_id} is busy: its lease keeps changing hands")

    def claim_leases(self, user_ids: Sequence[int], owner: str, seconds: float) -> list[Config]:
        """Claim the leases of a page of users in one statement: the configs of those it
        got (a user another runner holds, or without a config, is left out). Their
        ``open_rows`` are not filled in (see :meth:`Ledger.page_counts`)."""
        if not user_ids:
            return []
        now = utcnow()
        claim = (
            configs.update()
            .where(
                among(configs.c.user_id, user_ids, self.engine.dialect),
                sa.or_(
                    configs.c.lease_owner.is_(None),
                    configs.c.lease_owner == owner,
                    configs.c.lease_expires_at < now,
                ),
            )
            .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=seconds))
            .returning(*_CONFIG_COLUMNS)
        )
        with single(self.engine, "claim the leases") as conn:
            return [_config(row) for row in conn.execute(claim)]

    def release_leases(self, user_ids: Sequence[int], owner: str) -> None:
        """Give back the leases of a page of users this owner still holds (one statement)."""
        if not user_ids:
            return
        with single(self.engine, "release the leases") as conn:
            conn.execute(
                configs.update()
                .where(
                    among(configs.c.user_id, user_ids, self.engine.dialect),
                    configs.c.lease_owner == owner,
                )
                .values(lease_owner=None, lease_expires_at=None)
            )

    def renew_lease(self, user_id: int, owner: str, seconds: float) -> bool:
        """Extend a lease this owner holds; False when it was lost to another owner."""
        with single(self.engine, "renew the lease") as conn:
            renewed = conn.execute(
                configs.update()
                .where(configs.c.user_id == user_id, configs.c.lease_owner == owner)
                .values(lease_expires_at=utcnow() + timedelta(seconds=seconds))
            ).rowcount
        return renewed == 1

    @contextlib.contextmanager
    def keep_lease(self, user_id: int, owner: str, seconds: float) -> Iterator[None]:
        """Renew the lease every third of its life while the block runs (a long run keeps
        it; a dead runner's lease lapses within ``seconds``). One thread renews every
        lease of this directory."""
        self._keeper.add(user_id, owner, seconds)
        try:
            yield
        finally:
            self._keeper.remove(user_id, owner)

    def release_lease(self, user_id: int, owner: str) -> None:
        """Give the lease back (only if this owner still holds it)."""
        with single(self.engine, "release the lease") as conn:
            conn.execute(
                configs.update()
                .where(configs.c.user_id == user_id, configs.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            )


@functools.cache
def config_at_version(release: bool) -> sa.Update:
    """The config moved to version ``b_version`` (connected, no error) and, with
    ``release``, the lease owner ``b_owner`` holds given back. The ledger runs it in the
    same statement or transaction as a step's "completed" row, so the two never disagree.
    """
    now = sa.bindparam("b_now", type_=sa.DateTime)
    values: dict[str, object] = {
        "schema_version": sa.bindparam("b_version"),
        "connection_status": "connected",
        "last_error": None,
        "updated_at": now,
    }
    if release:
        mine = configs.c.lease_owner == sa.bindparam("b_owner")
        values["lease_owner"] = sa.case((mine, None), else_=configs.c.lease_owner)
        values["lease_expires_at"] = sa.case((mine, None), else_=configs.c.lease_expires_at)
    user = sa.bindparam("b_user", type_=sa.Integer)
    return configs.update().where(configs.c.user_id == user).values(**values)
