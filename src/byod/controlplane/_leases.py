"""One thread that renews every lease a process holds, instead of a thread per user.

A lease is renewed every third of its life while its work runs; registering one is a
dictionary entry, not a thread start (which cost a user about a millisecond). The thread
starts on first use, in each process (a forked worker starts its own).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from byod.errors import ByodError

__all__ = ["LeaseKeeper"]

log = logging.getLogger("byod.runner")

#: renew(user_id, owner, seconds): whether the owner still holds the lease
Renew = Callable[[int, str, float], bool]
_Key = tuple[int, str]


class LeaseKeeper:
    """Renews the leases registered with :meth:`add` until :meth:`remove`; after
    :meth:`remove` returns, that lease is never renewed again (a renewal under way is
    waited for), so a released lease is not taken back."""

    def __init__(self, renew: Renew) -> None:
        self._renew = renew
        self._lock = threading.Condition()
        self._leases: dict[_Key, tuple[float, float]] = {}  # key -> (next renewal, seconds)
        self._renewing: set[_Key] = set()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, user_id: int, owner: str, seconds: float) -> None:
        """Keep this lease from now on, renewing it every ``seconds / 3``."""
        with self._lock:
            self._leases[(user_id, owner)] = (time.monotonic() + seconds / 3, seconds)
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="byod-leases", daemon=True)
                self._thread.start()
            self._lock.notify()

    def remove(self, user_id: int, owner: str) -> None:
        """Stop keeping this lease (waiting for a renewal of it under way)."""
        key = (user_id, owner)
        with self._lock:
            self._leases.pop(key, None)
            while key in self._renewing:
                self._lock.wait()

    def _run(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                due = [(key, s) for key, (at, s) in self._leases.items() if at <= now]
                if not due:
                    nearest = min((at for at, _ in self._leases.values()), default=now + 60)
                    self._lock.wait(max(nearest - now, 0.01))
                    continue
                for key, seconds in due:
                    self._leases[key] = (now + seconds / 3, seconds)
                    self._renewing.add(key)
            for key, seconds in due:
                self._renew_one(key, seconds)

    def _renew_one(self, key: _Key, seconds: float) -> None:
        user_id, owner = key
        try:
            if not self._renew(user_id, owner, seconds):
                log.error("user %s: lease lost to another runner", user_id)
                with self._lock:
                    self._leases.pop(key, None)
        except ByodError as exc:
            log.warning("user %s: lease renewal failed: %s", user_id, exc.message)
        finally:
            with self._lock:
                self._renewing.discard(key)
                self._lock.notify_all()
