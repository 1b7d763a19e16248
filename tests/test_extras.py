"""Which extra a feature needs: checked without importing, named in the error, and an
import of an extra's package mapped to the same error (the command line's exit 2)."""

from __future__ import annotations

import sys
import types

import pytest

from byod import extras
from byod.errors import MissingExtraError


def test_an_installed_extra_passes_even_when_a_module_has_no_spec(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # found by schemathesis on a served API: kombu in sys.modules with __spec__ None made
    # importlib's find_spec raise ValueError, a 500 where a 503 was due
    stand_in = types.ModuleType("kombu")
    stand_in.__spec__ = None
    monkeypatch.setitem(sys.modules, "kombu", stand_in)
    extras.require("celery", "a distributed run")


def test_a_missing_package_names_the_extra_and_the_pip_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(extras.EXTRAS, "serve", ("byod_no_such_module_anywhere",))
    with pytest.raises(MissingExtraError) as caught:
        extras.require("serve", "byod serve")
    assert caught.value.exit_code == 2 and caught.value.extra == "serve"
    assert "byod serve needs byod's 'serve' extra" in caught.value.message
    assert 'pip install "byod[serve]"' in caught.value.hint


def test_an_import_error_of_an_extras_package_becomes_its_error_and_no_other() -> None:
    with pytest.raises(MissingExtraError) as caught, extras.needs("a PostgreSQL instance"):
        raise ModuleNotFoundError("No module named 'psycopg.pq'", name="psycopg.pq")
    assert caught.value.extra == "postgres"
    with pytest.raises(ModuleNotFoundError), extras.needs("anything"):
        raise ModuleNotFoundError("No module named 'yaml'", name="yaml")  # a real bug
