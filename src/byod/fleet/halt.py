"""When a fleet run halts: the one policy, for in-process and distributed runs alike."""

from __future__ import annotations

from byod.spec import FleetOptions

__all__ = ["halt_reason"]


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
