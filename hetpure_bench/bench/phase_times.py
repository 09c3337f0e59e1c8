"""Wall time per phase of a command (loading, attack + evaluate, sanity checks, leaderboard),
summed over its rows and printed at the end, so that a slow phase is visible at a glance."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator


class PhaseTimes:
    """Seconds per named phase, in the order the phases first ran; ``clock`` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = self.clock()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - started

    def summary(self) -> str:
        """One line: "time per phase: loading 2.1 s, attack + evaluate 30.0 s; total 32.1 s"."""
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items())
        return f"time per phase: {parts}; total {sum(self.seconds.values()):.1f} s"
