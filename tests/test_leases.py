"""The lease keeper: one thread renews every lease a process holds.

No fixed sleeps: time passing is shown by a witness lease the same keeper renews (a lease
that must not be renewed any more is checked after the witness was renewed twice more, so
it had every chance)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from byod.controlplane._leases import LeaseKeeper


def wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    """Until ``condition`` holds (the test fails after ``seconds``, a bound no run nears)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def test_leases_are_renewed_each_third_of_their_life_and_never_after_removal() -> None:
    renewed: list[tuple[int, str, float]] = []
    slow = threading.Event()

    def renew(user_id: int, owner: str, seconds: float) -> bool:
        renewed.append((user_id, owner, seconds))
        if user_id == 2:
            slow.wait(0.3)  # a renewal under way when its lease is removed
        return True

    def count(user_id: int) -> int:
        return len([r for r in renewed if r[0] == user_id])

    keeper = LeaseKeeper(renew)
    keeper.add(1, "a", 0.3)
    keeper.add(2, "b", 0.3)
    wait_for(lambda: count(2) >= 1)
    keeper.remove(2, "b")  # waits for a renewal of 2 under way
    removed_at = count(2)
    ones = count(1)
    wait_for(lambda: count(1) >= ones + 2)  # user 1 renewed twice more: time went by
    assert count(2) == removed_at, "never renewed after removal"
    assert all(seconds == 0.3 for _, _, seconds in renewed)
    keeper.remove(1, "a")
    after = count(1)
    keeper.add(3, "witness", 0.3)
    wait_for(lambda: count(3) >= 2)
    assert count(1) == after


def test_a_lease_lost_to_another_runner_is_no_longer_renewed() -> None:
    calls: list[int] = []

    def renew(user_id: int, owner: str, seconds: float) -> bool:
        calls.append(user_id)
        return user_id != 7  # another runner holds 7 now

    keeper = LeaseKeeper(renew)
    keeper.add(7, "a", 0.15)
    keeper.add(8, "witness", 0.15)
    wait_for(lambda: calls.count(8) >= 3)
    assert calls.count(7) == 1
    keeper.remove(7, "a")
    keeper.remove(8, "witness")
