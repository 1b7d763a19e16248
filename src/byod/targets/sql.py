"""SQL instances through SQLAlchemy: SQLite files, PostgreSQL and MySQL/MariaDB databases.

Each dialect brings how to open it (timeouts, SQLite's transactional-DDL recipe) and how
to take the instance-side lock inside the migration's transaction. The stamp table
``byod_schema_stamp`` lives in the instance and is written only here, in the same
transaction as the migration.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from byod.clock import utcnow
from byod.errors import (
    ByodError,
    InstanceTimeoutError,
    MigrationFailedError,
    RehearsalError,
    SettingsError,
)
from byod.instance_url import SUPPORTED_KINDS
from byod.registry import Backfill, Migration, Step
from byod.settings import safe_url
from byod.targets import backfill
from byod.targets._connect import connect, describe_error
from byod.targets._sql_adoption import SqlAdoption
from byod.targets._sql_base import (
    CREATE_DIRTY,
    CREATE_STAMP,
    DIRTY_TABLE,
    create_sql,
    dirty_error,
    dirty_table,
)
from byod.targets.base import (
    CONTROL_PLANE_TABLE,
    BatchBody,
    Phase,
    StampEntry,
    StepBody,
    check_position,
    control_plane_refusal,
    started,
)
from byod.targets.dialects import DIALECTS, STAMP_TABLE, table_exists, timed_out

__all__ = ["STAMP_TABLE", "SqlTarget", "describe_error", "open_target"]


def _timeout(step: Step, exc: DBAPIError) -> InstanceTimeoutError:
    return InstanceTimeoutError(
        f"{step.migration.id} {step.direction} was stopped by the timeout: {describe_error(exc)}"
    )


def open_target(
    url: URL, *, timeout: float = 10.0, ssl_ca: str | None = None, address: str | None = None
) -> SqlTarget:
    """Connect to a SQL instance within ``timeout`` seconds.

    ``timeout`` also bounds each read and write on the connection until a step runs
    (a server that accepts the connection and never answers is given up on); a step's
    own bound is its deadline. ``ssl_ca``: the operator's CA file (or ``system``) that
    verifies the instance's certificate where the URL asks for verification.
    ``address``: the IP address of the URL's host that was checked against the instance
    policy; the connection goes there (the name still serves TLS).

    Raises :class:`SettingsError` for a kind of database byod does not support and
    :class:`UnreachableError` when the instance does not answer.
    """
    dialect = DIALECTS.get(url.get_backend_name())
    if dialect is None:
        supported = ", ".join(SUPPORTED_KINDS)
        raise SettingsError(
            f"instances of kind {url.get_backend_name()!r} are not supported (use {supported})"
        )
    engine, conn = connect(url, dialect, timeout, ssl_ca, address)
    return SqlTarget(
        engine, conn, dialect, where=safe_url(url), io_timeout=timeout, kind=url.get_backend_name()
    )


#: How long past a step's deadline the client still waits for the server's own
#: timeout to stop the statement, before it gives up on the connection.
_DEADLINE_GRACE = 5.0


class SqlTarget(SqlAdoption):
    """An open connection to one SQL instance; see :class:`byod.targets.base.Target`."""

    def prepare(self, first: Migration | None = None) -> None:
        """Nothing to do: a SQL instance's schema is what its migrations make it."""

    def finish(self, at: Migration | None, head: bool) -> None:
        """Nothing to do after the last step: a SQL instance has no app code to deploy."""

    def begin(self, deadline: float | None = None) -> list[StampEntry]:
        """See :meth:`byod.targets.base.Target.begin`."""
        look = self._dialect.lock_and_look
        if look is None:
            return self.read_stamp()
        self._give_up_held()
        control_plane_id, self._unchecked_control_plane = self._unchecked_control_plane, None
        guarded = self._dialect.non_transactional_ddl  # its dirty markers read with the stamp
        names = (
            STAMP_TABLE,
            *((DIRTY_TABLE,) if guarded else ()),
            *(() if control_plane_id is None else (CONTROL_PLANE_TABLE,)),
        )
        timeout_ms = None if deadline is None else max(1, int((deadline - time.monotonic()) * 1000))
        try:
            transaction = self._conn.begin()
        except SQLAlchemyError as exc:
            raise self._busy_or_lost(exc) from exc
        try:
            present = look(self._conn, timeout_ms, names)
            if CONTROL_PLANE_TABLE in present and self._holds_id(str(control_plane_id)):
                raise control_plane_refusal(self.where)
            stamp, dirty = self._select_present(present)
            if dirty:
                raise dirty_error(dirty)
        except DBAPIError as exc:
            self._rollback_quietly(transaction)
            if timed_out(exc):
                raise InstanceTimeoutError(
                    f"instance {self.where}: reading the stamp was stopped by the timeout: "
                    f"{describe_error(exc)}"
                ) from exc
            raise self._lost("reading the stamp", exc) from exc
        except BaseException:
            self._rollback_quietly(transaction)
            raise
        self._stamp_ready = STAMP_TABLE in present
        self._dirty_ready = DIRTY_TABLE in present
        self._held = (transaction, stamp)
        return stamp

    def rehearse(self, deadline: float | None = None) -> list[StampEntry]:
        """See :meth:`byod.targets.base.Target.rehearse`."""
        if self._dialect.non_transactional_ddl:
            raise RehearsalError(
                f"{self.kind} instances cannot be rehearsed: their DDL commits on its own, "
                "so it cannot be rolled back"
            )
        stamp = self.begin(deadline)
        held = self._take_held()
        assert held is not None
        self._rehearsal = held[0]
        return stamp

    def apply(
        self,
        step: Step,
        body: StepBody,
        deadline: float | None = None,
        phase: Phase = "whole",
    ) -> bool:
        """See :meth:`byod.targets.base.Target.apply`."""
        self._check_control_plane()
        timeout_ms = self._timeout_ms(step, deadline)
        with self._bounded(timeout_ms):
            return self._apply(step, body, deadline, timeout_ms, phase)

    def read_progress(self, step: Step) -> backfill.Progress | None:
        """See :meth:`byod.targets.base.Target.read_progress`."""
        self._check_control_plane()
        try:
            with self._reading():
                exists = self._conn.execute(table_exists(self._dialect, backfill.PROGRESS_TABLE))
                return backfill.read(self._conn, step, bool(exists.scalar()))
        except SQLAlchemyError as exc:
            raise self._lost("reading the step's progress", exc) from exc

    def apply_batch(
        self,
        step: Step,
        at: backfill.Progress,
        work: Backfill,
        batch_size: int,
        body: BatchBody,
        deadline: float | None = None,
    ) -> backfill.Batch:
        """See :meth:`byod.targets.base.Target.apply_batch`."""
        self._check_control_plane()
        self._give_up_held()
        timeout_ms = self._timeout_ms(step, deadline)
        with self._bounded(timeout_ms):
            try:
                transaction = self._transaction()
            except SQLAlchemyError as exc:
                raise self._busy_or_lost(exc) from exc
            try:
                self._batch_lock(timeout_ms)
                done = backfill.run_batch(
                    self._conn,
                    step,
                    at,
                    work,
                    batch_size,
                    lambda conn, rows: self._run_body(step, lambda c: body(c, rows)),
                )
            except DBAPIError as exc:
                self._rollback_batch(transaction)
                if timed_out(exc):
                    raise _timeout(step, exc) from exc
                raise self._busy_or_lost(exc) from exc
            except BaseException:
                self._rollback_batch(transaction)
                raise
            try:
                transaction.commit()
            except SQLAlchemyError as exc:
                raise self._lost(f"committing a batch of {step.migration.id}", exc) from exc
            return done

    def _batch_lock(self, timeout_ms: int | None) -> None:
        settings = self._dialect.batch_settings
        if settings is None:
            self._dialect.lock(self._conn, timeout_ms, False)
        elif not self._batch_settings_set:
            settings(self._conn, timeout_ms)
            self._batch_settings_set = True

    def _rollback_batch(self, transaction: sa.Transaction) -> None:
        self._rollback_quietly(transaction)
        self._batch_settings_set = False  # a rollback takes them back

    def _timeout_ms(self, step: Step, deadline: float | None) -> int | None:
        if deadline is None:
            return None
        timeout_ms = int((deadline - time.monotonic()) * 1000)
        if timeout_ms <= 0:
            raise InstanceTimeoutError(f"the timeout ran out before {step.migration.id}")
        return timeout_ms

    @contextlib.contextmanager
    def _bounded(self, timeout_ms: int | None) -> Iterator[None]:
        # the transaction's own bound: its deadline (and a grace for the server's timeout to
        # speak first), or none at all; a long migration is never cut by the connect timeout
        step_io = None if timeout_ms is None else timeout_ms / 1000 + _DEADLINE_GRACE
        self._dialect.io_timeout(self._conn, step_io)
        try:
            yield
        finally:
            self._dialect.io_timeout(self._conn, self._io_timeout)
            # after the commit or rollback: a session lock (MySQL) outlives transactions
            self._dialect.lock_cleanup(self._conn)

    def _apply(
        self,
        step: Step,
        body: StepBody,
        deadline: float | None,
        timeout_ms: int | None,
        phase: Phase,
    ) -> bool:
        guarded = self._dialect.non_transactional_ddl
        held = self._take_held()
        held_stamp = None
        transaction: sa.Transaction
        if held is not None:  # begin's: locked, the stamp read in it
            transaction, held_stamp = held
        else:
            try:
                transaction = self._transaction()
            except SQLAlchemyError as exc:
                raise self._busy_or_lost(exc) from exc
        try:
            stamp = self._locked_stamp(held_stamp, timeout_ms)
            self._restamp(stamp)
            if not check_position(step, stamp) or (
                phase == "schema" and started(step, self._progress_ids())
            ):
                transaction.rollback()
                return False
            if guarded:  # committed by the body's first DDL, if it has any
                if not self._dirty_ready:
                    self._conn.exec_driver_sql(create_sql(CREATE_DIRTY, self._engine.dialect))
                    self._dirty_ready = True
                self._conn.execute(
                    dirty_table.insert().values(
                        id=step.migration.id, direction=step.direction, started_at=utcnow()
                    )
                )
            self._run_body(step, body)
            if deadline is not None and time.monotonic() > deadline:
                raise InstanceTimeoutError(f"{step.migration.id} ran past the timeout")
            if phase == "schema":
                backfill.start(self._conn, step)  # the stamp waits for the finalize
            else:
                if phase == "finalize":
                    backfill.finish(self._conn, step)
                self._write_stamp(step)
            if guarded:
                self._conn.execute(
                    dirty_table.delete().where(dirty_table.c.id == step.migration.id)
                )
        except DBAPIError as exc:
            self._rollback_quietly(transaction)
            self._raise_if_dirty(step, exc)
            if timed_out(exc):
                raise _timeout(step, exc) from exc
            raise self._busy_or_lost(exc) from exc
        except BaseException as exc:
            self._rollback_quietly(transaction)
            if guarded and isinstance(exc, ByodError):
                self._raise_if_dirty(step, exc)
            raise
        try:
            transaction.commit()
        except SQLAlchemyError as exc:
            raise self._lost(f"committing {step.migration.id} (outcome unknown)", exc) from exc
        self._stamp_ready = True
        return True

    def _locked_stamp(
        self, held: list[StampEntry] | None, timeout_ms: int | None
    ) -> list[StampEntry]:
        """In the step's transaction: the lock (or, in :meth:`begin`'s, its new bound), the
        stamp table where it is missing, and the stamp (``held``: already read under it)."""
        if held is None and not self._rehearsing():
            self._dialect.lock(self._conn, timeout_ms, True)
        else:  # locked already, by begin() or the rehearsal
            self._dialect.rebound(self._conn, timeout_ms)
        if not self._stamp_ready:
            self._conn.exec_driver_sql(create_sql(CREATE_STAMP, self._engine.dialect))
        return self._select_stamp(known_to_exist=True) if held is None else held

    def _progress_ids(self) -> list[str]:
        exists = self._conn.execute(table_exists(self._dialect, backfill.PROGRESS_TABLE))
        return backfill.ids(self._conn, bool(exists.scalar()))

    def in_progress(self) -> list[str]:
        """See :meth:`byod.targets.base.Target.in_progress`."""
        self._check_control_plane()
        try:
            with self._reading():
                return self._progress_ids()
        except SQLAlchemyError as exc:
            raise self._lost("reading the steps in progress", exc) from exc

    def _run_body(self, step: Step, body: Callable[[sa.Connection], None]) -> None:
        """The migration's own code, its errors told apart: a lost connection, the
        server's timeout, or the migration's failure."""
        try:
            body(self._conn)
        except ByodError:
            raise
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise self._lost(f"running {step.migration.id}", exc) from exc
            if timed_out(exc):
                raise _timeout(step, exc) from exc
            raise MigrationFailedError(describe_error(exc)) from exc
        except Exception as exc:
            raise MigrationFailedError(describe_error(exc)) from exc
