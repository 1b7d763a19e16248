"""Fleet runs started over HTTP: each in a thread, answering with its run id at once."""

from __future__ import annotations

import threading

from byod import commands, metrics
from byod.controlplane import User
from byod.errors import BusyError, ByodError
from byod.fleet import FleetEvent, FleetStarted, FleetSummary
from byod.spec import FleetOptions, Selection
from byod.workspace import Workspace

__all__ = ["BackgroundRuns"]


class BackgroundRuns:
    """Starts fleet runs in threads; at most one run per user at a time."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self._lock = threading.Lock()
        self._users_running: set[int] = set()

    def start_for_user(self, user: User, *, started_by: str) -> str:
        """A run for one user's own instance (by byod id, never looked up again);
        :class:`BusyError` if one is under way."""
        with self._lock:
            if user.id in self._users_running or self._lease_held(user.id):
                raise BusyError(f"a migration run is already under way for user {user.id}")
            self._users_running.add(user.id)
        try:
            return self._start(
                FleetOptions(concurrency=1), Selection(users=(user.id,)), user.id, started_by
            )
        except BaseException:
            with self._lock:
                self._users_running.discard(user.id)
            raise

    def start_fleet(
        self,
        options: FleetOptions,
        selection: Selection,
        *,
        started_by: str,
        rehearse: bool = False,
    ) -> str:
        """A fleet run with the given options (``rehearse``: a rehearsal); ``started_by``:
        the caller's subject."""
        return self._start(options, selection, None, started_by, rehearse)

    def _lease_held(self, user_id: int) -> bool:
        return commands.instance_busy(self.ws, user_id)

    def _start(
        self,
        options: FleetOptions,
        selection: Selection,
        user_id: int | None,
        started_by: str,
        rehearse: bool = False,
    ) -> str:
        started = threading.Event()
        box: dict[str, object] = {}

        def on_event(event: FleetEvent) -> None:
            if isinstance(event, FleetStarted):
                box["run_id"] = event.run_id
                started.set()

        def work() -> None:
            try:
                run = commands.rehearse_fleet if rehearse else commands.migrate_fleet
                summary: FleetSummary = run(
                    self.ws,
                    options=options,
                    selection=selection,
                    on_event=on_event,
                    started_by=started_by,
                )
                box.setdefault("run_id", summary.run_id)
            except ByodError as exc:
                box["error"] = exc
            finally:
                started.set()
                if user_id is not None:
                    with self._lock:
                        self._users_running.discard(user_id)

        threading.Thread(target=work, name="byod-api-run", daemon=True).start()
        kind = "rehearsal" if rehearse else "fleet" if user_id is None else "user"
        metrics.RUNS_STARTED.labels(kind).inc()
        started.wait(30)
        error = box.get("error")
        if isinstance(error, ByodError):
            raise error
        run_id = box.get("run_id")
        if not isinstance(run_id, str):
            raise BusyError("the run did not start in time")
        return run_id
