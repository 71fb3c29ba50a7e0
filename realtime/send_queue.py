"""A send queue that gives up the *oldest* waiting items when it is over its bound.

Both senders of frames use it: the frame publisher (bounded in frames; a sending thread has
the head "in flight") and the remote client's per-engine queue (bounded in bytes). The
display wants the newest frames, so when the link or the engine is slow the oldest unsent
ones go; the newest item and the one being sent are never given up. Not thread-safe: the
owner holds its own lock where two threads share it.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

__all__ = ["DropOldestQueue"]

T = TypeVar("T")


class DropOldestQueue(Generic[T]):
    """FIFO of items with a cost each (1 per item, or its bytes), bounded by ``max_items``
    and/or ``max_cost``; ``dropped`` counts the items given up."""

    def __init__(self, *, max_items: int | None = None, max_cost: float | None = None) -> None:
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if max_cost is not None and not max_cost > 0:
            raise ValueError(f"max_cost must be > 0, got {max_cost}")
        self.max_items = max_items
        self.max_cost = max_cost
        self._items: deque[tuple[T, float]] = deque()
        self.cost = 0.0
        self.head_in_flight = False  # the head is being sent: never drop it
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T, cost: float = 1.0) -> int:
        """Append ``item``; drop the oldest waiting items while over the bound. Returns how many went."""
        self._items.append((item, cost))
        self.cost += cost
        n = 0
        while self._over() and len(self._items) > 1 + self.head_in_flight:
            i = 1 if self.head_in_flight else 0
            _, c = self._items[i]
            del self._items[i]
            self.cost -= c
            n += 1
        self.dropped += n
        return n

    def peek(self) -> T:
        """The oldest item (the next to send)."""
        return self._items[0][0]

    def pop(self) -> T:
        """Remove the oldest item once it was sent."""
        item, c = self._items.popleft()
        self.cost -= c
        self.head_in_flight = False
        return item

    def clear(self) -> int:
        """Give up everything waiting (counted in ``dropped``); returns how many."""
        n = len(self._items)
        self._items.clear()
        self.cost, self.head_in_flight = 0.0, False
        self.dropped += n
        return n

    def _over(self) -> bool:
        return ((self.max_items is not None and len(self._items) > self.max_items)
                or (self.max_cost is not None and self.cost > self.max_cost))
