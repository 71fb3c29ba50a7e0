"""ConvGRU super-resolution over a rolling window of blinking frames (thesis ch. 4, app. A).

Per-frame encoder -> 2-layer ConvGRU over the window (eq. 4.2) -> mean of the last layer's
hidden states over time (eq. 4.3b) -> upsampling decoder (eq. 4.4). The streaming engine
caches each frame's encoding, so a new frame is encoded once; the GRU still runs over the
whole window because its state depends on where the window starts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

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

MODEL_NAME = "convgru"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "convgru.pt"


@dataclass
class ConvGRUConfig:
    """Architecture hyper-parameters (stored inside the weights file)."""

    hidden: int = 20      # encoder features and GRU hidden channels (thesis: 20 best)
    layers: int = 2       # stacked ConvGRU layers
    n_res: int = 2        # residual blocks in the encoder
    kernel: int = 3       # GRU convolution kernel
    upsample: int = 2
    window: int = ENGINES[MODEL_NAME].default_window  # frames per output


class ConvGRUCell(nn.Module):
    """Thesis eq. 4.2: update/reset gates and candidate from convs over [x, h]."""

    def __init__(self, cin: int, hidden: int, kernel: int = 3):
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Conv2d(cin + hidden, 2 * hidden, kernel, padding=kernel // 2)
        self.cand = nn.Conv2d(cin + hidden, hidden, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        u, r = torch.sigmoid(self.gates(torch.cat([x, h], 1))).chunk(2, dim=1)
        c = torch.tanh(self.cand(torch.cat([x, r * h], 1)))
        return (1 - u) * h + u * c


class ConvGRUNet(nn.Module):
    """The network; input already normalised (B, T, H, W) -> (B, 1, uH, uW)."""

    def __init__(self, cfg: ConvGRUConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ConvGRUConfig()
        self.encoder = FrameEncoder(cfg.hidden, cfg.n_res)
        self.cells = nn.ModuleList(
            [ConvGRUCell(cfg.hidden, cfg.hidden, cfg.kernel) for _ in range(cfg.layers)])
        self.decoder = Decoder(cfg.hidden, cfg.upsample)
        xavier_init(self)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W) normalised -> (B, T, C, H, W) encodings, each frame independently."""
        b, t, h, w = frames.shape
        x = frames.reshape(b * t, 1, h, w).contiguous(memory_format=torch.channels_last)
        return self.encoder(x).reshape(b, t, -1, h, w)

    def fuse_decode(self, enc: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) encodings -> (B, 1, uH, uW): GRU over T, mean over T, decode."""
        b, t, c, h, w = enc.shape
        cl = torch.channels_last
        zero = enc.new_zeros(b, self.cfg.hidden, h, w).contiguous(memory_format=cl)
        states = [zero for _ in self.cells]
        acc = zero
        for i in range(t):
            x = enc[:, i].contiguous(memory_format=cl)
            for k, cell in enumerate(self.cells):
                states[k] = cell(x, states[k])
                x = states[k]
            acc = acc + x
        return self.decoder(acc / t)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.fuse_decode(self.encode(frames))


def build_model(config: dict | None = None) -> tuple[ConvGRUNet, NormConfig]:
    """Rebuild model + normalisation from a weights-file config dict (or defaults)."""
    return build_from_config(ConvGRUNet, ConvGRUConfig, config)  # type: ignore[return-value]


def load_model(path: str | Path | None = None) -> tuple[ConvGRUNet, NormConfig, dict]:
    """Load a trained model; WeightsError naming the file on any problem."""
    return load_trained(Path(path) if path is not None else DEFAULT_WEIGHTS, MODEL_NAME,
                        build_model)  # type: ignore[return-value]


class ConvGRUEngine(NetworkEngine):
    """Engine API (CONTRACTS.md section 3) around ConvGRUNet with a cached-encoder window.

    push() encodes only the new frame and keeps the last `window` encodings (and normalisation
    scales) in a ring; the GRU and decoder then run over the cached encodings. Frames are
    normalised one by one (nn_common.normalise_with_scale), so a cached encoding equals a
    recomputed one exactly. Outputs are in ADU^2 (nn_common.OutputConfig): the network's
    output mapped back with the mean scale of the window's frames.
    """

    name = MODEL_NAME
    min_window = ENGINES[name].min_window
    backend_targets = ENGINES[name].backend_targets

    def __init__(self, weights: str | Path | None = None, *, device: str = "cpu",
                 precision: str = "fp32", window: int | None = None,
                 model: ConvGRUNet | None = None, norm: NormConfig | None = None):
        config: dict = {}
        path = None
        if model is None:
            path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
            model, norm, config = load_model(path)
        super().__init__(model, norm, config, int(window or model.cfg.window), upsample=model.cfg.upsample,
                         device=device, precision=precision, weights_path=path)
        self._enc: deque[torch.Tensor] = deque(maxlen=self.window)
        self._scales: deque[torch.Tensor] = deque(maxlen=self.window)

    def _encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, H, W) raw float32 -> (T, C, H, W) encodings and the (T,) frame scales."""
        x, scale = normalise_with_scale(frames, self.norm)
        return self.model.encode(x.to(self.model_dtype)[None])[0], scale

    def _fuse_decode(self, enc: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return self._output(self.model.fuse_decode(enc[None])[0, 0], scales.mean())

    def _reconstruct(self, frames: torch.Tensor) -> torch.Tensor:
        return self._fuse_decode(*self._encode(frames))

    def push(self, frame) -> np.ndarray | None:
        """Add one (H, W) frame; the newest window's output once `window` frames were pushed."""
        t = self._frame_tensor(frame)
        self._frame_shape = (int(t.shape[0]), int(t.shape[1]))
        with torch.inference_mode():
            enc, scale = self._encode(t[None])
            self._enc.append(enc[0])
            self._scales.append(scale[0])
            if len(self._enc) < self.window:
                return None
            out = self._fuse_decode(torch.stack(tuple(self._enc)), torch.stack(tuple(self._scales)))
        return self._to_numpy(out)

    def reset(self) -> None:
        super().reset()
        self._enc.clear()
        self._scales.clear()


def engine_from_model(model: ConvGRUNet, norm: NormConfig, *, device: str = "cpu",
                      precision: str = "fp32") -> ConvGRUEngine:
    """The live engine around a model in memory (fine-tuning scores what the user will see;
    the latency benchmark times untrained weights)."""
    return ConvGRUEngine(model=model, norm=norm, device=device, precision=precision)


def training_net(*, frames: int, hidden: int | None = None) -> tuple[ConvGRUNet, ConvGRUConfig]:
    """A fresh network for ``livesr train``: one output per window of ``frames`` frames."""
    arch = ConvGRUConfig(window=frames)
    if hidden:
        arch.hidden = hidden
    return ConvGRUNet(arch), arch


#: ``livesr train --preset``: cpu = a shared 2-core CPU (1.14 s/step on a quiet core), gpu = one
#: GPU on a 16-core host (see engines.training)
TRAIN_PRESETS: dict[str, dict] = {
    "cpu": dict(steps=20000, batch=4, lr=1e-3, lr_final=1e-5, data=dict(size=32, frames=20)),
    "gpu": dict(steps=40000, batch=32, lr=1e-3, lr_final=1e-5, workers=14, eval_n=64,
                eval_every=500, ckpt_every=500, data=dict(size=48, frames=20)),
}


def load(*, weights: str | Path | None = None, device: str = "cpu", precision: str = "fp32",
         window: int | None = None) -> ConvGRUEngine:
    """Factory used by engines.load_engine (weights default: engines/weights/convgru.pt)."""
    return ConvGRUEngine(weights, device=device, precision=precision, window=window)
