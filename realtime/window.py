"""Rolling window of the newest camera frames, with continuity checks.

An output must only ever be computed from consecutive frames of one stream: a sequence gap,
a repeated/out-of-order frame number, or a change of frame shape or dtype starts a new window.

Frames are kept in a preallocated ring that stores each frame twice (at ``i`` and
``i + size``), so the newest frames are always one *contiguous* slice: :meth:`stack` is a
zero-copy view, not a concatenation, at the price of one extra frame copy per append.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RollingWindow", "StreamContinuity"]


class StreamContinuity:
    """Tracks whether the next frame continues the current run (same shape, seq + 1)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.last_seq: int | None = None
        self.shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None
        self.count = 0  # frames in the current run

    def continues(self, seq: int, shape: tuple[int, ...], dtype: np.dtype) -> bool:
        """True if a frame (seq, shape, dtype) directly follows the current run."""
        return (
            self.last_seq is not None
            and seq == self.last_seq + 1
            and tuple(shape) == self.shape
            and np.dtype(dtype) == self.dtype
        )

    def advance(self, seq: int, shape: tuple[int, ...], dtype: np.dtype) -> bool:
        """Account for a new frame; returns True when it starts a new run (a reset)."""
        new_run = not self.continues(seq, shape, dtype)
        if new_run:
            self.shape, self.dtype, self.count = tuple(shape), np.dtype(dtype), 0
        self.last_seq = seq
        self.count += 1
        return new_run


class RollingWindow:
    """The newest ``size`` consecutive frames of a stream, oldest first."""

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"window size must be a positive int, got {size!r}")
        self.size = size
        self._buf: np.ndarray | None = None  # (2 * size, H, W)
        self._continuity = StreamContinuity()
        self.resets = 0  # how many times a gap or a shape change restarted the window

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget all frames (the buffer is kept for reuse)."""
        self._continuity.reset()

    def __len__(self) -> int:
        return min(self._continuity.count, self.size)

    @property
    def full(self) -> bool:
        return len(self) == self.size

    @property
    def run_length(self) -> int:
        """Frames appended since the last reset (may exceed ``size``)."""
        return self._continuity.count

    @property
    def seq_last(self) -> int | None:
        return self._continuity.last_seq if len(self) else None

    @property
    def seq_first(self) -> int | None:
        last = self.seq_last
        return None if last is None else last - len(self) + 1

    @property
    def seq_range(self) -> tuple[int, int] | None:
        """(first, last) sequence numbers held, or None when empty."""
        last = self.seq_last
        return None if last is None else (last - len(self) + 1, last)

    def continues(self, seq: int, frame: np.ndarray) -> bool:
        """Would ``frame`` extend the current run (rather than reset the window)?"""
        return self._continuity.continues(seq, frame.shape, frame.dtype)

    # ------------------------------------------------------------------ data
    def append(self, seq: int, frame: np.ndarray) -> bool:
        """Add one frame; returns True if it started a new window (gap or shape change)."""
        frame = np.asarray(frame)
        if frame.ndim != 2:
            raise ValueError(f"expected a 2-D frame, got shape {frame.shape}")
        had_frames = self._continuity.count > 0
        new_run = self._continuity.advance(seq, frame.shape, frame.dtype)
        if new_run:
            if had_frames:
                self.resets += 1
            if self._buf is None or self._buf.shape[1:] != frame.shape or self._buf.dtype != frame.dtype:
                self._buf = np.empty((2 * self.size, *frame.shape), dtype=frame.dtype)
        buf = self._buf
        assert buf is not None  # (a first frame always starts a new run)
        i = (self._continuity.count - 1) % self.size
        buf[i] = frame
        buf[i + self.size] = frame
        return new_run

    def stack(self) -> np.ndarray:
        """The held frames, oldest first, as a read-only (n, H, W) view (no copy)."""
        n = len(self)
        if n == 0 or self._buf is None:
            return np.empty((0, 0, 0), dtype=np.uint16)
        count = self._continuity.count
        if count <= self.size:
            view = self._buf[:count]
        else:
            start = count % self.size
            view = self._buf[start : start + self.size]
        view = view.view()
        view.flags.writeable = False
        return view

    def newest(self) -> np.ndarray | None:
        n = len(self)
        if n == 0:
            return None
        return self.stack()[-1]
