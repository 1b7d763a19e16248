"""Where an app's migrations come from: a byod folder (``NNN_slug.py`` files) or an
Alembic history as it is (see :mod:`byod.alembic_history`). One entry point, so every
part of byod (runs, plans, workers, ``--processes``) reads a folder the same way."""

from __future__ import annotations

from pathlib import Path

from byod.alembic_history import alembic_location, load_alembic_history
from byod.registry import Registry

__all__ = ["is_alembic_history", "load_registry"]


def is_alembic_history(path: Path) -> bool:
    """Whether ``path`` names an Alembic history rather than a byod folder."""
    return path.exists() and alembic_location(path)


def load_registry(path: Path, *, keep_alembic_version: bool = False) -> Registry:
    """The validated migrations at ``path``: a byod migrations folder, or an Alembic
    ``alembic.ini``, script location or ``versions/`` folder (:class:`RegistryError`
    naming the file for anything broken). ``keep_alembic_version``: an Alembic history's
    steps also move the instance's ``alembic_version`` (a changeover)."""
    if is_alembic_history(path):
        migrations = load_alembic_history(path, keep_alembic_version=keep_alembic_version)
        return Registry(migrations, source=path, keep_alembic_version=keep_alembic_version)
    return Registry.load(path)
