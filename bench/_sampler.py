"""A per-thread sampling profiler for the benches: every few milliseconds it records, for
each thread but its own, the innermost frame of byod's code and the innermost frame of
all (what the thread waits on), and counts them. cProfile sees only the thread that
starts it; this sees the fleet's worker threads."""

from __future__ import annotations

import collections
import sys
import threading
import time
from types import FrameType


class Sampler:
    """Start it, run the work, stop it; :meth:`top` gives the most seen places."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.byod: collections.Counter[str] = collections.Counter()
        self.leaf: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                self.samples += 1
                self.leaf[_where(frame)] += 1
                own = _innermost_byod(frame)
                if own is not None:
                    self.byod[own] += 1

    def top(self, n: int = 15) -> dict[str, list[tuple[str, float]]]:
        """The most seen places, as shares of all samples."""
        total = max(self.samples, 1)
        return {
            "byod": [(k, round(v / total, 3)) for k, v in self.byod.most_common(n)],
            "leaf": [(k, round(v / total, 3)) for k, v in self.leaf.most_common(n)],
        }


def _where(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_filename.rsplit('/', 2)[-2:]!s}:{code.co_name}:{frame.f_lineno}"


def _innermost_byod(frame: FrameType | None) -> str | None:
    while frame is not None:
        if "/byod/" in frame.f_code.co_filename:
            return _where(frame)
        frame = frame.f_back
    return None


def measure(seconds: float) -> None:  # pragma: no cover - a manual check
    sampler = Sampler()
    sampler.start()
    time.sleep(seconds)
    sampler.stop()
