"""Streaming ConvLSTM super-resolution (DBlink-style causal many-to-many).

Per-frame encoder -> 2-layer ConvLSTM whose state carries from frame to frame -> decoder on
the last layer's hidden state every frame. Each new frame costs one encoder pass, one cell
update per layer and one decoder pass, and yields a new image: far cheaper per output than
re-running a 20-frame ConvGRU window. Outputs are reported after a warm-up of `warmup`
frames since reset, because the state needs that long to accumulate blinking statistics.

The engine is *stateful* (``stateful = True``): its output depends on every frame since
reset(), so a live worker that falls behind must not reset it to catch up (a re-warm costs
`warmup` frames per output and never gets out of the warm-up). ``push_many(frames)`` feeds a
backlog in one call - the per-frame encoder batched, the cell updated frame by frame, the
decoder run only for the newest frame - and reports how the time split (``last_cost``) so the
worker can decide how many queued frames to feed (realtime.worker.plan_stateful_feed).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engines.base import as_tensor
from engines.nn_common import (
    WEIGHTS_DIR,
    Decoder,
    FrameEncoder,
    NetworkEngine,
    NormConfig,
    WeightsError,  # noqa: F401  (re-exported: callers catch engines.convgru.WeightsError)
    build_from_config,
    load_trained,
    normalise_with_scale,
    xavier_init,
)
from engines.registry import ENGINES

MODEL_NAME = "convlstm"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "convlstm.pt"

State = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ConvLSTMConfig:
    """Architecture hyper-parameters (stored inside the weights file)."""

    hidden: int = 16      # encoder features and LSTM hidden channels
    layers: int = 2
    n_res: int = 2
    kernel: int = 3
    upsample: int = 2
    warmup: int = ENGINES[MODEL_NAME].default_window  # frames since reset before outputs are reported


class ConvLSTMCell(nn.Module):
    """Convolutional LSTM cell: input/forget/output gates and candidate from one conv."""

    def __init__(self, cin: int, hidden: int, kernel: int = 3):
        super().__init__()
        self.hidden = hidden
        self.conv = nn.Conv2d(cin + hidden, 4 * hidden, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor, hc: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = hc
        i, f, o, g = self.conv(torch.cat([x, h], 1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class ConvLSTMNet(nn.Module):
    """The network; inputs are normalised frames, state carried explicitly."""

    def __init__(self, cfg: ConvLSTMConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ConvLSTMConfig()
        self.encoder = FrameEncoder(cfg.hidden, cfg.n_res)
        self.cells = nn.ModuleList(
            [ConvLSTMCell(cfg.hidden, cfg.hidden, cfg.kernel) for _ in range(cfg.layers)])
        self.decoder = Decoder(cfg.hidden, cfg.upsample)
        xavier_init(self)
        with torch.no_grad():  # forget-gate bias 1: remember by default (standard LSTM trick)
            for cell in self.cells:
                assert isinstance(cell, ConvLSTMCell) and cell.conv.bias is not None
                cell.conv.bias[cfg.hidden:2 * cfg.hidden].fill_(1.0)

    def zero_state(self, b: int, h: int, w: int, like: torch.Tensor) -> State:
        z = like.new_zeros(b, self.cfg.hidden, h, w).contiguous(memory_format=torch.channels_last)
        return [(z, z) for _ in self.cells]

    def update(self, enc: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One frame's cell updates: enc (B, C, H, W) -> last layer's hidden, new state."""
        x, new = enc.contiguous(memory_format=torch.channels_last), []
        for cell, hc in zip(self.cells, state, strict=True):
            h, c = cell(x, hc)
            new.append((h, c))
            x = h
        return x, new

    def step(self, enc: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One frame: enc (B, C, H, W) encoding -> (B, 1, uH, uW) output and new state."""
        x, new = self.update(enc, state)
        return self.decoder(x), new

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W) normalised -> (B, T, C, H, W), each frame independently."""
        b, t, h, w = frames.shape
        x = frames.reshape(b * t, 1, h, w).contiguous(memory_format=torch.channels_last)
        return self.encoder(x).reshape(b, t, -1, h, w)

    def forward(self, frames: torch.Tensor, state: State | None = None, decode_from: int = 0
                ) -> tuple[torch.Tensor, State]:
        """(B, T, H, W) normalised -> (B, T - decode_from, uH, uW) outputs of frames
        decode_from.. (training skips decoding the warm-up frames), and the final state."""
        b, t, h, w = frames.shape
        enc = self.encode(frames)
        state = state if state is not None else self.zero_state(b, h, w, enc)
        hs = []
        for i in range(t):
            x, state = self.update(enc[:, i], state)
            if i >= decode_from:
                hs.append(x)
        # decode all kept frames in one batched call (cheaper than one call per frame)
        y = self.decoder(torch.cat(hs, 0))[:, 0]
        y = y.reshape(len(hs), b, *y.shape[-2:]).transpose(0, 1)
        return y, state


def build_model(config: dict | None = None) -> tuple[ConvLSTMNet, NormConfig]:
    """Rebuild model + normalisation from a weights-file config dict (or defaults)."""
    return build_from_config(ConvLSTMNet, ConvLSTMConfig, config)  # type: ignore[return-value]


def load_model(path: str | Path | None = None) -> tuple[ConvLSTMNet, NormConfig, dict]:
    """Load a trained model; WeightsError naming the file on any problem."""
    return load_trained(Path(path) if path is not None else DEFAULT_WEIGHTS, MODEL_NAME,
                        build_model)  # type: ignore[return-value]


class ConvLSTMEngine(NetworkEngine):
    """Engine API around ConvLSTMNet: push() updates the carried state, one output per frame.

    `window` (= `warmup`) is the number of frames since reset() before the first output; after
    that every pushed frame yields an output at the cost of one frame. reconstruct(stack) runs
    the WHOLE stack from zero state (the state depends on every frame seen), exactly as if the
    frames had been pushed after a reset, and returns the last output; it leaves the streaming
    state untouched. Outputs are in ADU^2 (nn_common.OutputConfig): the network's output mapped
    back with the mean normalisation scale of the trailing `model.cfg.warmup` frames (the
    training's convention, whatever warm-up this engine reports outputs after).
    """

    name = MODEL_NAME
    min_window = ENGINES[name].min_window
    frames_per_output = 1
    stateful = ENGINES[name].stateful  # True: never reset to catch up: skip outputs, not state
    encode_batch = 4  # frames per encoder call in push_many (batching helps most on a GPU)
    backend_targets = ENGINES[name].backend_targets

    def __init__(self, weights: str | Path | None = None, *, device: str = "cpu",
                 precision: str = "fp32", warmup: int | None = None,
                 model: ConvLSTMNet | None = None, norm: NormConfig | None = None):
        config: dict = {}
        path = None
        if model is None:
            path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
            model, norm, config = load_model(path)
        super().__init__(model, norm, config, int(warmup or model.cfg.warmup), upsample=model.cfg.upsample,
                         device=device, precision=precision, weights_path=path)
        self._state: State | None = None
        self._count = 0
        self._scales: deque[torch.Tensor] = deque(maxlen=self.model.cfg.warmup)
        #: (seconds spent ingesting frames, seconds making the output) of the last push/push_many
        self.last_cost: tuple[float, float] | None = None

    @property
    def warmup(self) -> int:
        return self.window

    def _encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (N, H, W) raw -> encodings (N, C, H, W) and each frame's scale (N,)."""
        x, scale = normalise_with_scale(frames, self.norm)
        x = x.to(self.model_dtype)
        return self.model.encoder(x[:, None].contiguous(memory_format=torch.channels_last)), scale

    def _update(self, enc: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """One frame's cell updates from its (1, C, H, W) encoding."""
        if state is None:
            state = self.model.zero_state(1, enc.shape[-2], enc.shape[-1], enc)
        return self.model.update(enc, state)

    def _decode(self, h: torch.Tensor, scales: deque[torch.Tensor]) -> torch.Tensor:
        """Last layer's hidden state -> the engine's image (ADU^2), with the trailing scales."""
        return self._output(self.model.decoder(h)[0, 0], torch.stack(tuple(scales)).mean())

    def reconstruct(self, stack) -> np.ndarray:
        """(T, H, W), T >= warmup: run all T frames from zero state; the last output."""
        t = as_tensor(stack, ndim=3, device=self.device, dtype=self.compute_dtype, what="stack")
        if t.shape[0] < self.window:
            raise ValueError(f"{self.name}: needs at least warmup={self.window} frames, "
                             f"got {t.shape[0]}")
        self._check_spatial(tuple(t.shape), "stack")
        state: State | None = None
        scales: deque[torch.Tensor] = deque(maxlen=self.model.cfg.warmup)
        with torch.inference_mode():
            for f in t:
                enc, scale = self._encode(f[None])
                h, state = self._update(enc, state)
                scales.append(scale[0])
            out = self._decode(h, scales)
        return self._to_numpy(out)

    def push(self, frame) -> np.ndarray | None:
        """Add one (H, W) frame; an output once `warmup` frames were pushed since reset()."""
        return self.push_many([frame])

    def push_many(self, frames, *, output: bool = True) -> np.ndarray | None:
        """Feed frames (oldest first) into the carried state; the output of the newest only.

        Equivalent to pushing them one by one and keeping the last output, but the frames that
        need no output skip the decoder and are encoded in batches of ``encode_batch``.
        ``output=False`` feeds the state only (returns None).
        """
        ts = [self._frame_tensor(f) for f in frames]
        if not ts:
            raise ValueError(f"{self.name}: push_many needs at least one frame")
        shapes = {tuple(t.shape) for t in ts}
        if len(shapes) != 1:
            raise ValueError(f"{self.name}: push_many frames differ in shape: {sorted(shapes)}")
        self._frame_shape = (int(ts[0].shape[0]), int(ts[0].shape[1]))
        t0 = time.perf_counter()
        with torch.inference_mode():
            h = None
            for i in range(0, len(ts), self.encode_batch):
                enc, scale = self._encode(torch.stack(ts[i:i + self.encode_batch]))
                for j in range(enc.shape[0]):
                    h, self._state = self._update(enc[j:j + 1], self._state)
                    self._scales.append(scale[j])
            self._count += len(ts)
            t1 = time.perf_counter()
            if self._count < self.window or not output:
                self.last_cost = (t1 - t0, 0.0)
                return None
            assert h is not None  # (at least one frame was encoded)
            out = self._to_numpy(self._decode(h, self._scales))
        self.last_cost = (t1 - t0, time.perf_counter() - t1)
        return out

    def reset(self) -> None:
        super().reset()
        self._state, self._count = None, 0
        self._scales.clear()


def engine_from_model(model: ConvLSTMNet, norm: NormConfig, *, device: str = "cpu",
                      precision: str = "fp32") -> ConvLSTMEngine:
    """The live engine around a model in memory (fine-tuning scores what the user will see;
    the latency benchmark times untrained weights)."""
    return ConvLSTMEngine(model=model, norm=norm, device=device, precision=precision)


def training_net(*, frames: int, hidden: int | None = None) -> tuple[ConvLSTMNet, ConvLSTMConfig]:
    """A fresh network for ``livesr train`` (one output per frame: ``frames``, the training
    sequence length, does not change the architecture)."""
    arch = ConvLSTMConfig()
    if hidden:
        arch.hidden = hidden
    return ConvLSTMNet(arch), arch


#: ``livesr train --preset``: cpu = a shared 2-core CPU (1.63 s/step on a quiet core), gpu = one
#: GPU on a 16-core host (see engines.training)
TRAIN_PRESETS: dict[str, dict] = {
    "cpu": dict(steps=20000, batch=4, lr=1e-3, lr_final=1e-5, warmup_loss=8,
                data=dict(size=32, frames=32, per_frame_targets=True, target_from=8, p_moving=0.5)),
    "gpu": dict(steps=40000, batch=32, lr=1e-3, lr_final=1e-5, warmup_loss=10, workers=14,
                eval_n=64, eval_every=500, ckpt_every=500,
                data=dict(size=48, frames=40, per_frame_targets=True, target_from=10, p_moving=0.5)),
}


def load(*, weights: str | Path | None = None, device: str = "cpu", precision: str = "fp32",
         window: int | None = None) -> ConvLSTMEngine:
    """Factory used by engines.load_engine; `window` sets the warm-up (default: engines.registry)."""
    return ConvLSTMEngine(weights, device=device, precision=precision, warmup=window)
