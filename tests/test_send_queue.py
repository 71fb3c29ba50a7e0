"""The one drop-oldest send queue (frame publisher backlog, remote per-engine queue)."""

from __future__ import annotations

import pytest

from realtime.protocol import EngineCounts
from realtime.send_queue import DropOldestQueue


def test_count_bound_drops_the_oldest_but_never_the_head_in_flight():
    q: DropOldestQueue[int] = DropOldestQueue(max_items=3)
    assert [q.put(i) for i in range(3)] == [0, 0, 0]
    assert q.put(3) == 1 and q.peek() == 1 and q.dropped == 1  # 0 went
    q.head_in_flight = True  # 1 is being sent: 2 goes instead
    assert q.put(4) == 1 and q.peek() == 1
    assert [q.pop() for _ in range(len(q))] == [1, 3, 4] and q.dropped == 2


def test_cost_bound_keeps_the_newest_even_when_it_alone_is_over():
    q: DropOldestQueue[str] = DropOldestQueue(max_cost=10)
    q.put("a", 4)
    q.put("b", 4)
    assert q.put("c", 4) == 1 and q.cost == 8  # a went
    assert q.put("eos", 0) == 0 and len(q) == 3  # a zero-cost item within the bound pushes nothing out
    assert q.put("huge", 50) == 3 and len(q) == 1 and q.peek() == "huge"
    assert q.clear() == 1 and q.dropped == 5 and q.cost == 0 and not q


@pytest.mark.parametrize("kw", [{"max_items": 0}, {"max_cost": 0}])
def test_bad_bounds_are_refused(kw):
    with pytest.raises(ValueError):
        DropOldestQueue(**kw)


def test_engine_counts_add_up_and_subtract():
    a = EngineCounts(frames_received=5, outputs=2, outputs_skipped=1, malformed={"json": 1}, last_error="x")
    b = EngineCounts(frames_received=3, outputs=1, malformed={"json": 2, "kind": 1}, engine_errors=1)
    total = EngineCounts.total([a, b])
    assert total == EngineCounts(frames_received=8, outputs=3, outputs_skipped=1,
                                 malformed={"json": 3, "kind": 1}, engine_errors=1, last_error="x")
    assert (total - b).frames_received == a.frames_received and (total - b).malformed == {"json": 1, "kind": 0}
