"""Operations on a SQL instance outside a migration's steps: adopting an instance
Alembic migrated (its ``alembic_version`` read, byod's stamp written under the lock),
accepting a migration file's new checksum, and clearing the dirty markers an operator
repaired by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from byod.clock import utcnow
from byod.errors import (
    DriftError,
)
from byod.registry import Migration
from byod.targets._sql_base import (
    ALEMBIC_TABLE,
    CREATE_STAMP,
    INSERT_STAMP,
    SELECT_ALEMBIC,
    SqlConnection,
    create_sql,
    dirty_table,
    stamp_table,
)
from byod.targets.dialects import table_exists

__all__ = ["SqlAdoption"]


class SqlAdoption(SqlConnection):
    """A SQL instance's adoption and repair operations (see the module)."""

    def alembic_revisions(self) -> list[str] | None:
        """The revisions the instance's ``alembic_version`` table holds (None when it has
        no such table): what Alembic says is applied, for adopting the instance."""
        self._check_control_plane()
        try:
            with self._reading():
                return self._alembic_revisions()
        except SQLAlchemyError as exc:
            raise self._lost("reading alembic_version", exc) from exc

    def _alembic_revisions(self) -> list[str] | None:
        if not self._conn.execute(table_exists(self._dialect, ALEMBIC_TABLE)).scalar():
            return None
        return [str(r) for r in self._conn.execute(SELECT_ALEMBIC).scalars()]

    def adopt(self, migrations: Sequence[Migration], revisions: list[str]) -> bool:
        """Write the stamp of ``migrations`` (1…V, as Alembic applied them) in one
        transaction under the instance's lock, and nothing else; only while
        ``alembic_version`` still holds exactly ``revisions``. False when the stamp says
        exactly that already; :class:`DriftError` when it says anything else."""
        self._check_control_plane()
        wanted = [(m.id, m.version) for m in migrations]
        try:
            with self._conn.begin():
                self._dialect.lock(self._conn, None, True)
                self._conn.exec_driver_sql(create_sql(CREATE_STAMP, self._engine.dialect))
                stamp = [(e.id, e.version) for e in self._select_stamp(known_to_exist=True)]
                if stamp == wanted:
                    return False
                if stamp:
                    raise DriftError(
                        f"instance {self.where} has byod's stamp at {stamp[-1][0]} (version "
                        f"{stamp[-1][1]}) already, not {wanted[-1][0] if wanted else 'none'}: "
                        "not adopted"
                    )
                if self._alembic_revisions() != revisions:
                    raise DriftError(
                        f"instance {self.where}: alembic_version changed while it was adopted"
                    )
                now = utcnow()
                rows = [
                    {"id": m.id, "version": m.version, "checksum": m.checksum, "applied_at": now}
                    for m in migrations
                ]
                if rows:
                    self._conn.execute(INSERT_STAMP, rows)
        except DBAPIError as exc:
            raise self._busy_or_lost(exc) from exc
        finally:
            self._dialect.lock_cleanup(self._conn)
        self._stamp_ready = True
        return True

    def accept_checksum(self, migration: Migration) -> str | None:
        """Under the instance's lock, in one transaction: ``migration``'s stamp row takes
        its checksum now (an operator accepted the file's change); returns the checksum it
        had, or None when it is not applied here or has that one already."""
        self._check_control_plane()
        try:
            with self._conn.begin():
                self._dialect.lock(self._conn, None, True)
                stamp = {e.id: e.checksum for e in self._select_stamp()}
                old = stamp.get(migration.id)
                if old is None or old == migration.checksum:
                    return None
                self._conn.execute(
                    stamp_table.update()
                    .where(stamp_table.c.id == migration.id)
                    .values(checksum=migration.checksum)
                )
                return old
        except DBAPIError as exc:
            raise self._busy_or_lost(exc) from exc
        finally:
            self._dialect.lock_cleanup(self._conn)

    def clear_dirty(self) -> list[str]:
        """Forget the dirty markers (after an operator repaired the instance by hand)."""
        if not self._dialect.non_transactional_ddl:
            return []
        self._check_control_plane()
        with self._conn.begin():
            markers = self._select_dirty()
            self._conn.execute(dirty_table.delete())
        return markers
