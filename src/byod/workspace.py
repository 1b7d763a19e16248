"""The workspace: settings, and what they open (control plane, migrations, key), each
opened once, on first use. Every command is a function of one (Alembic's ``Config``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING

import sqlalchemy as sa

from byod.controlplane import Directory, open_engine, require_tables
from byod.errors import SettingsError
from byod.notify import load_notifier
from byod.registry import Registry
from byod.settings import Settings
from byod.sources import load_registry

if TYPE_CHECKING:  # the runner and the distributed core are imported only by what runs them
    from byod.crypto import KeySource, Sealer
    from byod.distributed import Broker
    from byod.runner import Runner

__all__ = ["BrokerFactory", "Workspace"]


#: Opens the task queue for these settings (front ends pass the Celery adapter's).
BrokerFactory = Callable[[Settings], "Broker"]


class Workspace:
    """Settings plus what they open, each opened once, on first use.

    ``broker``: how to open the task queue for distributed runs; a front end that offers
    them passes the adapter's (the core never imports one)."""

    def __init__(
        self,
        settings: Settings,
        *,
        create_key: bool = False,
        broker: BrokerFactory | None = None,
    ) -> None:
        self.settings = settings
        self._create_key = create_key
        self._broker_factory = broker
        self._tables_checked = False
        self.key_source: KeySource | None = None

    @cached_property
    def broker(self) -> Broker:
        """The task queue (:class:`SettingsError` when none is configured)."""
        if self._broker_factory is None:
            raise SettingsError("distributed runs are not available here: no task queue")
        return self._broker_factory(self.settings)

    @cached_property
    def engine(self) -> sa.Engine:
        """The control-plane engine."""
        return open_engine(self.settings.database_url)

    @cached_property
    def registry(self) -> Registry:
        """The migrations, loaded and validated."""
        return load_registry(
            self.settings.migrations_dir,
            keep_alembic_version=self.settings.keep_alembic_version,
        )

    @cached_property
    def sealer(self) -> Sealer:
        """The sealer for the configured encryption key."""
        from byod.crypto import load_sealer  # cryptography: only for commands that unseal

        sealer, self.key_source = load_sealer(self.settings, create=self._create_key)
        return sealer

    @cached_property
    def directory(self) -> Directory:
        """Users and configs."""
        self.require_tables()
        return Directory(self.engine)

    def runner(self, *, run_id: str | None = None) -> Runner:
        """A runner on this workspace, with the configured notification hook."""
        from byod.runner import Runner

        notify = load_notifier(self.settings.notify_hook)
        return Runner(
            self.engine,
            self.registry,
            self.sealer,
            notify=notify,
            run_id=run_id,
            policy=self.settings.instance_policy,
        )

    def require_tables(self) -> None:
        """Raise :class:`ControlPlaneError` unless ``byod init`` has run on this control
        plane (checked once per workspace: a long-lived service does not ask again)."""
        if not self._tables_checked:
            require_tables(self.engine)
            self._tables_checked = True
