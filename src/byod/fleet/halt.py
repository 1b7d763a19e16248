"""When a fleet run halts: the one policy, for in-process and distributed runs alike."""

from __future__ import annotations

from byod.spec import FleetOptions

__all__ = ["canary_over", "canary_room", "halt_reason"]


def halt_reason(
    options: FleetOptions, *, succeeded: int, failed: int, started: int, canary_over: bool
) -> str | None:
    """Why the run must halt now, or None.

    A canary wave (``--canary N``: the first N users) that ended with a failure halts the
    run before the rest start; ``canary_over`` says every user of that wave has finished
    (``started`` of them were started, N or fewer). Past the wave, failures above
    ``--max-failure-ratio`` of the finished users halt it.
    """
    canary = options.canary
    if canary and failed and canary_over:
        return f"a canary failed ({failed} of {min(started, canary)})"
    done = succeeded + failed
    ratio = options.max_failure_ratio
    if ratio is not None and done and failed / done > ratio:
        return f"{failed} of {done} failed, above --max-failure-ratio {ratio}"
    return None


def canary_room(options: FleetOptions, started: int, in_flight: int) -> int | None:
    """How many more users may start now for the canary wave: ``None`` when the wave
    sets no limit (no ``--canary``, or the wave is over), else that many (0: the wave's
    users are all started; wait for them to finish before anyone else starts)."""
    canary = options.canary
    if not canary or started > canary:
        return None
    if started < canary:
        return canary - started
    return 0 if in_flight else None


def canary_over(options: FleetOptions, started: int, in_flight: int, exhausted: bool) -> bool:
    """Whether every user of the canary wave has finished (the selection may have had
    fewer users than ``--canary``)."""
    canary = options.canary
    wave_started = started == canary or (exhausted and started < canary)
    return bool(canary) and wave_started and not in_flight
