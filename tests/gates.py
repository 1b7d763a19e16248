"""Events a test migration can wait on, so a test can hold a migration inside its
instance transaction while it does something else (a second run, a kill)."""

from __future__ import annotations

import threading

entered = threading.Event()
release = threading.Event()


def reset() -> None:
    entered.clear()
    release.clear()
