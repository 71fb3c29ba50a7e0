"""RollingWindow: ordered newest frames; a gap or a shape change starts a new window."""

from __future__ import annotations

import numpy as np
import pytest

from realtime.window import RollingWindow, StreamContinuity


def f(v: int, shape=(3, 3), dtype=np.uint16) -> np.ndarray:
    return np.full(shape, v, dtype=dtype)


def values(w: RollingWindow) -> list[int]:
    return [int(x[0, 0]) for x in w.stack()]


def test_fills_then_rolls_in_order():
    w = RollingWindow(4)
    assert len(w) == 0 and w.seq_range is None and w.stack().shape[0] == 0
    for s in range(3):
        assert w.append(s, f(s)) == (s == 0)
    assert values(w) == [0, 1, 2] and not w.full and w.seq_range == (0, 2)
    for s in range(3, 11):
        assert not w.append(s, f(s))
        assert values(w) == list(range(max(0, s - 3), s + 1))
    assert w.full and w.seq_range == (7, 10) and w.run_length == 11
    assert w.seq_first == 7 and w.seq_last == 10 and int(w.newest()[0, 0]) == 10


def test_stack_is_a_read_only_view_without_copy():
    w = RollingWindow(5)
    for s in range(13):
        w.append(s, f(s))
    st = w.stack()
    assert st.shape == (5, 3, 3) and st.flags.c_contiguous and not st.flags.writeable
    assert np.shares_memory(st, w._buf)


def test_reset_on_sequence_gap():
    w = RollingWindow(4)
    for s in range(6):
        w.append(s, f(s))
    assert w.append(8, f(8))  # gap 5 -> 8
    assert values(w) == [8] and w.seq_range == (8, 8) and w.resets == 1
    w.append(9, f(9))
    assert values(w) == [8, 9]


@pytest.mark.parametrize("seq", [5, 3, 0])  # repeated or going backwards
def test_reset_on_repeated_or_backwards_seq(seq):
    w = RollingWindow(4)
    for s in range(6):
        w.append(s, f(s))
    assert w.append(seq, f(seq)) and values(w) == [seq]


def test_reset_on_shape_change():
    w = RollingWindow(3)
    for s in range(4):
        w.append(s, f(s))
    assert w.append(4, f(4, shape=(2, 5)))
    assert w.stack().shape == (1, 2, 5) and w.seq_range == (4, 4)


def test_reset_on_dtype_change():
    w = RollingWindow(3)
    w.append(0, f(0))
    assert w.append(1, f(1, dtype=np.float32))
    assert w.stack().dtype == np.float32 and len(w) == 1


def test_explicit_reset_and_reuse():
    w = RollingWindow(3)
    for s in range(5):
        w.append(s, f(s))
    w.reset()
    assert len(w) == 0 and w.seq_range is None
    assert w.append(5, f(5))  # even seq+1 starts fresh after reset
    assert values(w) == [5]


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        RollingWindow(0)
    w = RollingWindow(3)
    with pytest.raises(ValueError):
        w.append(0, np.zeros((2, 2, 2)))


def test_continuity_tracker():
    c = StreamContinuity()
    assert c.advance(10, (4, 4), np.uint16)
    assert c.continues(11, (4, 4), np.uint16)
    assert not c.continues(12, (4, 4), np.uint16)
    assert not c.continues(11, (4, 5), np.uint16)
    assert not c.advance(11, (4, 4), np.uint16) and c.count == 2
