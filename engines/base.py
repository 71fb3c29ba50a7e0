"""The engine contract and the input handling every engine shares.

Why a base class next to the Protocol: every engine must reject the same bad input with the
same clear message (wrong ndim, too few frames, complex or non-numeric data, NaN) and must
offer the same streaming API. Writing that once here means a neural engine only implements
``_reconstruct`` on a ready tensor, and the SOFI engine only overrides ``push`` for speed.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .registry import PRECISIONS

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@runtime_checkable
class Engine(Protocol):
    """What the realtime worker, the CLI and the GUI may assume about any engine.

    ``reconstruct`` is called with a whole stack (offline, benchmarks, tests); ``push`` once per
    camera frame in the live pipeline; ``reset`` when the stream has a gap or changes shape.
    Output pixels (2i..2i+1, 2j..2j+1) cover input pixel (i, j).
    """

    name: str
    window: int
    upsample: int

    def reconstruct(self, stack: Any) -> np.ndarray:
        """(T, H, W) real stack, T >= window; uses the last ``window`` frames -> float32 (2H, 2W)."""
        ...

    def push(self, frame: Any) -> np.ndarray | None:
        """Add one (H, W) frame; the output of the newest window once ``window`` frames were pushed."""
        ...

    def reset(self) -> None:
        """Forget all streaming state."""
        ...


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda', 'cuda:1' or 'auto' -> a usable torch.device, or a clear error."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is unavailable on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return dev


def check_real_dtype(x: np.ndarray | torch.Tensor, what: str = "input") -> None:
    """Raise TypeError unless ``x`` holds real numbers (unsigned/signed integers or floats)."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{what} must hold real numbers (integer or float), got torch dtype {x.dtype}")
        return
    if x.dtype.kind not in "uif":
        raise TypeError(f"{what} must hold real numbers (integer or float), got dtype {x.dtype}")


def as_tensor(
    x: Any,
    *,
    ndim: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    what: str = "input",
    check_finite: bool = True,
    copy: bool = False,
) -> torch.Tensor:
    """Validate ``x`` (numpy array, torch tensor or array-like) and return it as ``dtype`` on ``device``.

    Non-finite values are rejected for float input: one NaN would poison a running sum forever.
    ``copy=True`` guarantees the result shares no memory with ``x`` (needed for anything kept).
    """
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{what} is not an array: {type(x).__name__}") from exc
    check_real_dtype(x, what)
    src_is_float = x.is_floating_point() if isinstance(x, torch.Tensor) else x.dtype.kind == "f"
    if x.ndim != ndim:
        expected = "(T, H, W) stack" if ndim == 3 else "(H, W) frame"
        raise ValueError(f"{what} must be a {expected} ({ndim} dims), got shape {tuple(x.shape)}")
    if isinstance(x, np.ndarray):
        np_dtype = _NUMPY_DTYPES.get(dtype)
        if np_dtype is not None:
            # one conversion on the numpy side (torch's unsigned support is partial); with copy,
            # never hand back a view of the caller's buffer, which the caller may reuse
            x = np.array(x, dtype=np_dtype, copy=True) if copy else np.ascontiguousarray(x, dtype=np_dtype)
        elif x.dtype.kind == "u" and x.dtype != np.uint8:
            x = x.astype(np.int64)
        t = torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype)
    else:
        src = x.detach()
        t = src.to(device=device, dtype=dtype)
        if copy and t.data_ptr() == src.data_ptr():
            t = t.clone()
    if check_finite and src_is_float and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or infinite values")
    return t


class EngineBase:
    """Shared input checks plus a default rolling-window ``push``/``reset`` built on ``reconstruct``.

    Subclasses implement ``_reconstruct(frames)``: ``frames`` is a validated (window, H, W)
    tensor of ``compute_dtype`` on ``self.device``; they return a (2H, 2W) tensor. The default
    ``push`` keeps the last ``window`` converted frames and calls ``_reconstruct`` on them, so
    a neural engine gets streaming for free; engines with a cheaper incremental form (SOFI)
    override ``push`` and ``reset``.
    """

    name: str = "base"
    upsample: int = 2
    min_window: int = 1
    min_size: int = 1          # smallest H and W the algorithm accepts
    compute_dtype: torch.dtype = torch.float32
    #: the output is a learned estimate (a network), not computed from the data alone: the live
    #: worker then checks it against a companion SOFI (``engines.trust``)
    learned: bool = False

    def __init__(self, window: int, *, device: str | torch.device = "cpu", precision: str = "fp32") -> None:
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
            raise TypeError(f"window must be an int, got {type(window).__name__}")
        if window < self.min_window:
            raise ValueError(f"{self.name}: window must be >= {self.min_window}, got {window}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: choose one of {PRECISIONS}")
        self.window = int(window)
        self.device = resolve_device(device)
        self.precision = precision
        self._frames: deque[torch.Tensor] = deque(maxlen=self.window)
        self._frame_shape: tuple[int, int] | None = None

    # ------------------------------------------------------------------ input handling
    def _check_spatial(self, shape: tuple[int, ...], what: str) -> None:
        h, w = shape[-2:]
        if h < self.min_size or w < self.min_size:
            raise ValueError(f"{self.name}: {what} frames must be at least "
                             f"{self.min_size}x{self.min_size} pixels, got {h}x{w}")

    def _stack_tensor(self, stack: Any) -> torch.Tensor:
        """Validate a (T, H, W) stack and return its last ``window`` frames as a tensor."""
        if isinstance(stack, (np.ndarray, torch.Tensor)) and stack.ndim == 3:
            n = stack.shape[0]
            if n < self.window:
                raise ValueError(f"{self.name}: needs at least window={self.window} frames, got {n}")
            stack = stack[n - self.window:]  # slice before converting: never copy unused frames
        t = as_tensor(stack, ndim=3, device=self.device, dtype=self.compute_dtype, what="stack")
        if t.shape[0] < self.window:
            raise ValueError(f"{self.name}: needs at least window={self.window} frames, got {t.shape[0]}")
        self._check_spatial(tuple(t.shape), "stack")
        return t[-self.window:]

    def _frame_tensor(self, frame: Any) -> torch.Tensor:
        """Validate one (H, W) frame against the current stream and return it as a tensor."""
        t = as_tensor(frame, ndim=2, device=self.device, dtype=self.compute_dtype, what="frame", copy=True)
        self._check_spatial(tuple(t.shape), "streamed")
        shape = (int(t.shape[0]), int(t.shape[1]))
        if self._frame_shape is not None and shape != self._frame_shape:
            raise ValueError(
                f"{self.name}: frame shape {shape} differs from the stream's {self._frame_shape}; call reset() first"
            )
        return t

    @staticmethod
    def _to_numpy(img: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(img.detach().to("cpu", torch.float32).numpy())

    # ------------------------------------------------------------------ API
    def _reconstruct(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reconstruct(self, stack: Any) -> np.ndarray:
        frames = self._stack_tensor(stack)
        with torch.inference_mode():
            out = self._reconstruct(frames)
        return self._to_numpy(out)

    def push(self, frame: Any) -> np.ndarray | None:
        t = self._frame_tensor(frame)
        self._frame_shape = (int(t.shape[0]), int(t.shape[1]))
        self._frames.append(t)
        if len(self._frames) < self.window:
            return None
        with torch.inference_mode():
            out = self._reconstruct(torch.stack(tuple(self._frames)))
        return self._to_numpy(out)

    def reset(self) -> None:
        self._frames.clear()
        self._frame_shape = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, window={self.window}, device={str(self.device)!r})"
