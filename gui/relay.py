"""Hand data from pipeline threads to the Qt thread without ever queueing it.

The pipeline emits psygnal signals on its own threads, often faster than a screen can
refresh. Queued Qt connections would back up (every frame becomes an event); instead the
signal handlers only overwrite a slot under a lock, and a QTimer on the Qt thread takes
the newest value. A slow display therefore skips stale images and never stalls acquisition.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """Keep only the newest value; `take()` returns it once (then None until a new one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: T | None = None
        self._fresh = False
        self.n_put = 0  # how many values were offered (for counting skipped ones)

    def put(self, value: T) -> None:
        with self._lock:
            self._value = value
            self._fresh = True
            self.n_put += 1

    def take(self) -> T | None:
        with self._lock:
            if not self._fresh:
                return None
            self._fresh = False
            return self._value

    def peek(self) -> T | None:
        with self._lock:
            return self._value

    def clear(self) -> None:
        with self._lock:
            self._value = None
            self._fresh = False


class MessageQueue(Generic[T]):
    """Thread-safe FIFO of short messages (errors are rare and must all be shown)."""

    def __init__(self, maxlen: int = 100) -> None:
        self._items: deque[T] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def put(self, msg: T) -> None:
        with self._lock:
            self._items.append(msg)

    def drain(self) -> list[T]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items


class RateMeter:
    """Events per second over a sliding time window (monotonic clock)."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._lock = threading.Lock()
        self.count = 0

    def tick(self, n: int = 1, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for _ in range(n):
                self._times.append(now)
            self.count += n
            self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            n = len(self._times)
            if n < 2:
                return 0.0
            span = max(now - self._times[0], 1e-9)
            # n events in `span` seconds; use the full window once it is filled
            return n / max(span, min(self.window_s, span))

    def reset(self) -> None:
        with self._lock:
            self._times.clear()
            self.count = 0

    def _trim(self, now: float) -> None:
        cutoff = now - self.window_s
        while self._times and self._times[0] < cutoff:
            self._times.popleft()


class RollingLatency:
    """p50/p99 of the last `size` latencies (ms): the numbers a user watches while tuning."""

    def __init__(self, size: int = 200) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, ms: float) -> None:
        self._values.append(float(ms))

    def percentiles(self) -> tuple[float, float]:
        if not self._values:
            return float("nan"), float("nan")
        p50, p99 = np.percentile(np.fromiter(self._values, float), [50, 99])
        return float(p50), float(p99)

    def __len__(self) -> int:
        return len(self._values)

    def reset(self) -> None:
        self._values.clear()
