"""The lease keeper: one thread renews every lease a process holds."""

from __future__ import annotations

import threading
import time

from byod.controlplane._leases import LeaseKeeper


def test_leases_are_renewed_each_third_of_their_life_and_never_after_removal() -> None:
    renewed: list[tuple[int, str, float]] = []
    slow = threading.Event()

    def renew(user_id: int, owner: str, seconds: float) -> bool:
        renewed.append((user_id, owner, seconds))
        if user_id == 2:
            slow.wait(0.3)  # a renewal under way when its lease is removed
        return True

    keeper = LeaseKeeper(renew)
    keeper.add(1, "a", 0.3)
    keeper.add(2, "b", 0.3)
    time.sleep(0.35)
    keeper.remove(2, "b")  # waits for a renewal of 2 under way
    removed_at = len([r for r in renewed if r[0] == 2])
    time.sleep(0.35)
    ones = [r for r in renewed if r[0] == 1]
    assert len(ones) >= 2, renewed  # about every 0.1 s
    assert len([r for r in renewed if r[0] == 2]) == removed_at, "never renewed after removal"
    keeper.remove(1, "a")
    count = len(renewed)
    time.sleep(0.25)
    assert len(renewed) == count


def test_a_lease_lost_to_another_runner_is_no_longer_renewed() -> None:
    calls: list[int] = []

    def renew(user_id: int, owner: str, seconds: float) -> bool:
        calls.append(user_id)
        return False  # another runner holds it now

    keeper = LeaseKeeper(renew)
    keeper.add(7, "a", 0.15)
    time.sleep(0.3)
    assert calls == [7]
    keeper.remove(7, "a")
