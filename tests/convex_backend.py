"""The local Convex backend for tests (:mod:`byod.commands.convex_local`): one Node process
hosting deployments that run an app's real Convex functions on convex-test behind
Convex's HTTP API.

``convex_server`` (session-scoped; registered in ``tests/conftest.py``) starts one server
for the session and stops it at the end; each test makes its own deployments with
:meth:`ConvexServer.create` and gets their base URLs (clients POST to ``<base>/api/...``).
In CI (``CI=true``) a missing ``node`` or npm packages fail the test that asks for the
server; elsewhere it is skipped with the reason (as ``tests.conftest.require_server`` does
for database servers).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from byod.commands import convex_local
from byod.commands.convex_local import EXAMPLE_APP, ControlError
from byod.commands.convex_local import LocalConvex as ConvexServer

__all__ = ["DEPLOY", "EXAMPLE_APP", "ROOT", "ControlError", "ConvexServer", "start_server"]

ROOT = Path(__file__).resolve().parent.parent
#: The checkout runs the server in place: its packages installed by make beside it
DEPLOY = convex_local.Backend(convex_local.SHIPPED).deploy_command


def require_node() -> None:
    """Fail in CI, skip elsewhere, when Node or the npm packages are missing."""
    problem = convex_local.problem()
    if problem is None and not convex_local.runs_in_place():
        problem = "the local Convex backend's npm packages are missing: run `make`"
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(problem)
    pytest.skip(problem)


def start_server(log: Path) -> ConvexServer:
    """Start ``server.mjs`` on a free port (its stderr to ``log``) and wait for its port."""
    return convex_local.start(log, convex_local.Backend(convex_local.SHIPPED))


@pytest.fixture(scope="session")
def convex_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConvexServer]:
    """One local Convex backend for the session, stopped at the end."""
    require_node()
    server = start_server(tmp_path_factory.mktemp("convex-local") / "server.log")
    try:
        yield server
    finally:
        server.close()
