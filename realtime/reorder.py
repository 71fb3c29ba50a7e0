"""Put results from several engine workers back into sequence order, each exactly once.

Workers finish at different speeds, so their outputs interleave out of order on the
collector's sockets. The display and the saved output stack want one output per
sequence number, in order, and never a duplicate. A reorderer holds early results
briefly and releases them when the gap before them is filled or known to be lost.

A gap is *known lost* when every source that could fill it has already moved past it
(each worker publishes its outputs in increasing order), or when it has waited
`max_wait_s`, or when more than `max_pending` results are waiting (memory bound).
Results for sequence numbers already released are dropped and counted as `late`
(a duplicate, or a straggler past the deadline) so nothing is ever shown twice.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class ReorderStats:
    """What the reorderer did; `skipped` counts outputs that never arrived."""

    received: int = 0
    emitted: int = 0
    skipped: int = 0
    late: int = 0
    max_pending_seen: int = 0


@dataclass(order=True)
class _Pending(Generic[T]):
    seq: int
    arrived: float = field(compare=False)
    item: T = field(compare=False)


class ResultReorderer(Generic[T]):
    """Release `(seq, item)` pairs in increasing `seq`, each seq at most once.

    Parameters
    ----------
    step
        Distance between consecutive expected outputs (1 when every frame gives one).
    first_seq
        The first output expected (``window - 1`` for a fresh stream). ``None``: take the
        first result seen once it has waited `max_wait_s`, or at once if every source
        has reported.
    max_wait_s
        Longest a result waits for a missing predecessor (display latency bound).
    max_pending
        Most results held at once (memory bound).
    sources
        Identities of the workers feeding this reorderer; enables the fast "every source
        has moved past the gap" rule. Leave empty to rely on the deadline only.
    clock
        Monotonic clock in seconds (injectable for tests).
    """

    def __init__(
        self,
        *,
        step: int = 1,
        first_seq: int | None = None,
        max_wait_s: float = 0.25,
        max_pending: int = 256,
        sources: tuple[Hashable, ...] | list[Hashable] = (),
        clock: Callable[[], float] = time.monotonic,
    ):
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.step = step
        self.max_wait_s = max_wait_s
        self.max_pending = max_pending
        self._clock = clock
        self._heap: list[_Pending[T]] = []
        self._pending_seqs: set[int] = set()
        self._next: int | None = first_seq
        self._last_emitted: int | None = None
        self._progress: dict[Hashable, int] = {s: -1 for s in sources}
        self._lock = threading.Lock()
        self.stats = ReorderStats()

    @property
    def pending(self) -> int:
        return len(self._heap)

    def push(self, seq: int, item: T, source: Hashable | None = None) -> list[tuple[int, T]]:
        """Offer one result; return the results now releasable, in order."""
        with self._lock:
            now = self._clock()
            self.stats.received += 1
            if source is not None:
                prev = self._progress.get(source, -1)
                self._progress[source] = max(prev, seq)
            if (self._last_emitted is not None and seq <= self._last_emitted) or (
                seq in self._pending_seqs
            ):
                self.stats.late += 1
                return self._release(now)
            heapq.heappush(self._heap, _Pending(seq, now, item))
            self._pending_seqs.add(seq)
            self.stats.max_pending_seen = max(self.stats.max_pending_seen, len(self._heap))
            return self._release(now)

    def poll(self) -> list[tuple[int, T]]:
        """Release whatever has waited long enough (call periodically when idle)."""
        with self._lock:
            return self._release(self._clock())

    def flush(self) -> list[tuple[int, T]]:
        """Release everything held, in order (end of stream)."""
        with self._lock:
            out: list[tuple[int, T]] = []
            while self._heap:
                out.append(self._emit_head())
            return out

    def reset(self, first_seq: int | None = None) -> list[tuple[int, T]]:
        """Start over (new stream): flush what is held, then expect `first_seq`."""
        with self._lock:
            out: list[tuple[int, T]] = []
            while self._heap:
                out.append(self._emit_head())
            self._next = first_seq
            self._last_emitted = None
            self._progress = {s: -1 for s in self._progress}
            return out

    # ------------------------------------------------------------------ internals
    def _emit_head(self) -> tuple[int, T]:
        p = heapq.heappop(self._heap)
        self._pending_seqs.discard(p.seq)
        if self._next is not None and p.seq > self._next:
            self.stats.skipped += (p.seq - self._next + self.step - 1) // self.step
        self._last_emitted = p.seq
        self._next = p.seq + self.step
        self.stats.emitted += 1
        return p.seq, p.item

    def _gap_is_lost(self, head: _Pending[T], now: float) -> bool:
        if len(self._heap) > self.max_pending:
            return True
        if now - head.arrived >= self.max_wait_s:
            return True
        if self._progress:
            # each source publishes in increasing seq: once every source has reported
            # something at or beyond the head's predecessor, nothing before the head
            # can still arrive
            return min(self._progress.values()) >= head.seq - self.step
        return False

    def _release(self, now: float) -> list[tuple[int, T]]:
        out: list[tuple[int, T]] = []
        while self._heap:
            head = self._heap[0]
            if self._next is not None and head.seq <= self._next:
                out.append(self._emit_head())
            elif self._gap_is_lost(head, now):
                out.append(self._emit_head())
            else:
                break
        return out


__all__ = ["ReorderStats", "ResultReorderer"]
