"""Measuring a benchmark run: peak resident memory sampled on a thread, wall-clock buckets."""

from __future__ import annotations

import threading
import time
from typing import Any


class PeakRss:
    """Context manager sampling this process's RSS on a thread; ``peak`` in bytes.

    Without psutil, ``peak`` is the process's lifetime peak (``getrusage`` ``ru_maxrss``)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self, proc: Any) -> None:
        while True:
            self.peak = max(self.peak, int(proc.memory_info().rss))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRss:
        try:
            import psutil
        except ImportError:
            return self
        self._thread = threading.Thread(target=self._sample, args=(psutil.Process(),), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            import resource

            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            return
        self._stop.set()
        self._thread.join()


class timed:
    """Adds the block's wall time to ``clock[key]``."""

    def __init__(self, clock: dict[str, float], key: str) -> None:
        self.clock, self.key = clock, key

    def __enter__(self) -> None:
        self.t = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.clock[self.key] += time.perf_counter() - self.t
