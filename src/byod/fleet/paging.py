"""A fleet run's selection handed out a page at a time, each page claimed first.

Before any user of a page starts, the page's leases are claimed and the users' plans
written to the ledger in a few statements (:class:`byod.runner.pages.Claims`), so the
per-user path holds no control-plane write but the steps' own records, and a crash
always leaves a row to settle. A page is what the pool starts within a few seconds:
its size doubles while pages go by in under a second and halves when one takes longer
than four, between the pool's size and :data:`MAX_PAGE`. Once half a page is handed
out, the next is claimed on a thread of its own while the pool works (outside a canary
wave), so the pool never waits for a claim: at most two pages are held at once.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from byod.errors import ControlPlaneError
from byod.fleet.selection import Item
from byod.runner import Runner
from byod.runner.pages import Claims

__all__ = ["MAX_PAGE", "Pager"]

log = logging.getLogger("byod.fleet")

#: The most users one page claims.
MAX_PAGE = 1000


class Pager:
    """Items of the selection, each page of them claimed before the first is handed out.

    ``room``: how many more users may start now (the canary wave's), None for no limit.
    """

    def __init__(
        self,
        runner: Runner,
        claims: Claims,
        source: Iterator[Item],
        *,
        action: str,
        workers: int,
        room: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.runner = runner
        self.claims = claims
        self.source = source
        self.action = action
        self.workers = workers
        self.room = room
        self.size = min(MAX_PAGE, max(1, workers * 2))
        self._items: collections.deque[Item] = collections.deque()
        self._filled_at: float | None = None
        #: the next page, being claimed ahead (only that thread reads the source then)
        self._next: Future[list[Item]] | None = None

    def __iter__(self) -> Iterator[Item]:
        return self

    def __next__(self) -> Item:
        if not self._items:
            self._fill()
        if not self._items:
            raise StopIteration
        item = self._items.popleft()
        if self._next is None and len(self._items) <= self.size // 2 and self.room() is None:
            self._claim_ahead(self.size)
        return item

    def left(self, taken: Item | None = None) -> int:
        """The users not handed out (and ``taken``, handed out but never started): their
        claims given back; how many there were, the selection's rest counted too."""
        items = list(self._items)
        self._items.clear()
        items.extend(self._take_next())
        if taken is not None:
            items.append(taken)
        self.claims.forget(item.user.id for item in items)
        return len(items) + sum(1 for _ in self.source)

    def _fill(self) -> None:
        now = time.monotonic()
        if self._filled_at is not None:  # how long the last page lasted
            lasted = now - self._filled_at
            if lasted < 1.0:
                self.size = min(MAX_PAGE, self.size * 2)
            elif lasted > 4.0:
                self.size = max(self.workers, self.size // 2)
        self._filled_at = now
        if self._next is not None:  # claimed ahead while the last page ran
            self._items.extend(self._take_next())
            return
        size = self.size
        room = self.room()
        if room == 0:  # the canary wave is running: the next user waits for its verdict
            self._items.extend(itertools.islice(self.source, 1))  # unclaimed: a lone run
            return
        if room is not None:  # a canary wave claims no one past it
            size = min(size, room)
        self._items.extend(self._claimed_page(size))

    def _take_next(self) -> list[Item]:
        """The page claimed ahead, once its claim is done (none: empty)."""
        future, self._next = self._next, None
        return [] if future is None else future.result()

    def _claim_ahead(self, size: int) -> None:
        future: Future[list[Item]] = Future()

        def claim() -> None:
            try:
                future.set_result(self._claimed_page(size))
            except BaseException as exc:  # the pool's thread raises it where it takes the page
                future.set_exception(exc)

        self._next = future
        threading.Thread(target=claim, name="byod-next-page", daemon=True).start()

    def _claimed_page(self, size: int) -> list[Item]:
        """The selection's next ``size`` users, their page claimed (a user another runner
        holds stays unclaimed: it runs the lone user's way)."""
        items = list(itertools.islice(self.source, size))
        if not items:
            return items
        taken = {item.user.id: item for item in items}
        try:
            self.claims.claim(
                list(taken),
                lambda config: self.runner.page_plan(
                    self.action,
                    taken[config.user_id].user,
                    config,
                    taken[config.user_id].to_version,
                ),
            )
        except ControlPlaneError as exc:  # each user then waits for it on its own
            log.warning("fleet: cannot claim the next page of users: %s", exc.message)
        return items
