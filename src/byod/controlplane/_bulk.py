"""Users and their configs written a page at a time (``byod users import``): the
Directory's bulk path, in one transaction per page, so a file of tens of thousands of
users costs a few statements per thousand, not a transaction each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from byod.clock import utcnow
from byod.controlplane.schema import configs, users

__all__ = ["ExistingUser", "NewConfig", "existing_users", "insert_users", "write_configs"]


@dataclass(frozen=True)
class ExistingUser:
    """A user a page names that is there already, with its config if any (sealed)."""

    user_id: int
    clerk_id: str
    email: str | None
    sealed_url: str | None
    sealed_secret: str | None
    key_id: str | None
    leased: bool


@dataclass(frozen=True)
class NewConfig:
    """A config to store (status ``pending``), sealed for its user."""

    user_id: int
    target_kind: str
    sealed_url: str
    sealed_secret: str | None
    key_id: str
    replaces: bool


def existing_users(conn: sa.Connection, clerk_ids: Sequence[str]) -> dict[str, ExistingUser]:
    """The users among ``clerk_ids`` that exist (current ones), by clerk id."""
    now = utcnow()
    leased = sa.and_(configs.c.lease_owner.is_not(None), configs.c.lease_expires_at >= now)
    query = (
        sa.select(
            users.c.id,
            users.c.clerk_id,
            users.c.email,
            configs.c.sealed_url,
            configs.c.sealed_secret,
            configs.c.key_id,
            sa.case((leased, True), else_=False),
        )
        .select_from(users.outerjoin(configs, configs.c.user_id == users.c.id))
        .where(_among(conn, users.c.clerk_id, clerk_ids), users.c.removed_at.is_(None))
    )
    return {
        str(r[1]): ExistingUser(int(r[0]), str(r[1]), r[2], r[3], r[4], r[5], bool(r[6]))
        for r in conn.execute(query)
    }


def insert_users(conn: sa.Connection, new: Sequence[tuple[str, str | None]]) -> dict[str, int]:
    """Insert users (clerk id, email); their new ids by clerk id."""
    if not new:
        return {}
    now = utcnow()
    clerk_ids = [clerk for clerk, _ in new]
    if _on_postgresql(conn):
        found = conn.execute(
            _PG_INSERT_USERS,
            {"clerks": clerk_ids, "emails": [email for _, email in new], "now": now},
        )
    else:
        rows = [{"clerk_id": clerk, "email": email, "created_at": now} for clerk, email in new]
        conn.execute(users.insert(), rows)
        found = conn.execute(
            sa.select(users.c.id, users.c.clerk_id).where(
                _among(conn, users.c.clerk_id, clerk_ids), users.c.removed_at.is_(None)
            )
        )
    return {str(clerk): int(uid) for uid, clerk in found}


def _on_postgresql(conn: sa.Connection) -> bool:
    return conn.dialect.name == "postgresql"


def _among(
    conn: sa.Connection, column: sa.ColumnElement[str], values: Sequence[str]
) -> sa.ColumnElement[bool]:
    if _on_postgresql(conn):
        from sqlalchemy.dialects.postgresql import ARRAY  # only a PostgreSQL plane needs it

        texts = ARRAY(sa.Text)
        return column == sa.any_(sa.bindparam("among", list(values), type_=texts))
    return column.in_(list(values))


_PG_INSERT_USERS = sa.text(
    "INSERT INTO users (clerk_id, email, created_at)"
    " SELECT v.clerk_id, v.email, :now"
    " FROM unnest(CAST(:clerks AS text[]), CAST(:emails AS text[])) AS v(clerk_id, email)"
    " RETURNING id, clerk_id"
)

_PG_INSERT_CONFIGS = sa.text(
    "INSERT INTO byod_configs"
    " (user_id, target_kind, sealed_url, sealed_secret, key_id, connection_status, updated_at)"
    " SELECT v.user_id, v.kind, v.url, v.secret, v.key_id, 'pending', :now FROM unnest("
    "CAST(:user_ids AS integer[]), CAST(:kinds AS text[]), CAST(:urls AS text[]),"
    " CAST(:secrets AS text[]), CAST(:key_ids AS text[])) AS v(user_id, kind, url, secret, key_id)"
)

_PG_REPLACE_CONFIGS = sa.text(
    "UPDATE byod_configs SET target_kind = v.kind, sealed_url = v.url,"
    " sealed_secret = v.secret, key_id = v.key_id, connection_status = 'pending',"
    " last_error = NULL, updated_at = :now FROM unnest("
    "CAST(:user_ids AS integer[]), CAST(:kinds AS text[]), CAST(:urls AS text[]),"
    " CAST(:secrets AS text[]), CAST(:key_ids AS text[])) AS v(user_id, kind, url, secret, key_id)"
    " WHERE byod_configs.user_id = v.user_id"
)


_REPLACE = (
    configs.update()
    .where(configs.c.user_id == sa.bindparam("b_user"))
    .values(
        target_kind=sa.bindparam("b_kind"),
        sealed_url=sa.bindparam("b_url"),
        sealed_secret=sa.bindparam("b_secret"),
        key_id=sa.bindparam("b_key"),
        connection_status="pending",
        last_error=None,
        updated_at=sa.bindparam("b_now"),
    )
)


def write_configs(conn: sa.Connection, new: Sequence[NewConfig]) -> None:
    """Store each config, status ``pending``; a replaced one keeps its recorded version
    (``byod connect --check`` reads the instance's own)."""
    now = utcnow()
    if _on_postgresql(conn):
        for statement, part in (
            (_PG_REPLACE_CONFIGS, [c for c in new if c.replaces]),
            (_PG_INSERT_CONFIGS, [c for c in new if not c.replaces]),
        ):
            if part:
                conn.execute(statement, {**_columns(part), "now": now})
        return
    replaced = [
        {
            "b_user": c.user_id,
            "b_kind": c.target_kind,
            "b_url": c.sealed_url,
            "b_secret": c.sealed_secret,
            "b_key": c.key_id,
            "b_now": now,
        }
        for c in new
        if c.replaces
    ]
    if replaced:
        conn.execute(_REPLACE, replaced)
    added = [
        {
            "user_id": c.user_id,
            "target_kind": c.target_kind,
            "sealed_url": c.sealed_url,
            "sealed_secret": c.sealed_secret,
            "key_id": c.key_id,
            "connection_status": "pending",
            "updated_at": now,
        }
        for c in new
        if not c.replaces
    ]
    if added:
        conn.execute(configs.insert(), added)


def _columns(part: Sequence[NewConfig]) -> dict[str, list[object]]:
    """A page of configs as one array per column (PostgreSQL's ``unnest``)."""
    return {
        "user_ids": [c.user_id for c in part],
        "kinds": [c.target_kind for c in part],
        "urls": [c.sealed_url for c in part],
        "secrets": [c.sealed_secret for c in part],
        "key_ids": [c.key_id for c in part],
    }
