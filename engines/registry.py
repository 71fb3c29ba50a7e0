"""What livesr knows about each engine, backend and precision, without importing torch.

Why a torch-free table: the CLI, the GUI's Qt thread, the configuration checks and the
benchmarks need the engine names, default windows and backend lists long before (or without)
loading an engine; importing this module costs nothing. ``engines.load_engine`` builds an
engine from its ``factory`` entry; the engine classes read their facts (minimum window,
stateful, backend targets) from here, so each fact is written once.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ANY_ENGINE_MIN_WINDOW",
    "BACKENDS",
    "BACKEND_ALIASES",
    "BACKEND_CHOICES",
    "BACKEND_PRECISIONS",
    "ENGINES",
    "EngineInfo",
    "PRECISIONS",
    "canonical_backend",
    "default_window",
    "neural_engines",
    "parse_weights_arg",
]


@dataclass(frozen=True)
class EngineInfo:
    """One engine's facts; ``factory`` is ``"package.module:callable"``, imported on first use."""

    name: str
    factory: str
    default_window: int  # frames per output (ConvLSTM: the warm-up before its first output)
    min_window: int
    stateful: bool  # output depends on every frame since reset: skip outputs, never reset to catch up
    needs_weights: bool  # a trained network (False: computed from the data alone)
    backend_targets: tuple[str, ...]  # per-frame modules the execution backends compile
    description: str


ENGINES: dict[str, EngineInfo] = {
    e.name: e
    for e in (
        EngineInfo("sofi", "engines.sofi:SofiEngine", 20, 2, False, False, (),
                   "second-order SOFI cumulant of a rolling window (no training)"),
        EngineInfo("convgru", "engines.convgru:load", 20, 1, False, True,
                   ("model.encode", "model.fuse_decode"),
                   "ConvGRU network over a rolling window of frames"),
        EngineInfo("convlstm", "engines.convlstm:load", 20, 1, True, True,
                   ("model.encoder", "model.update", "model.decoder"),
                   "streaming ConvLSTM: one output per frame after a warm-up"),
    )
}

#: the smallest window that every registered engine accepts (what the CLI and the remote
#: server check before an engine is chosen or loaded)
ANY_ENGINE_MIN_WINDOW = max(e.min_window for e in ENGINES.values())

#: engine precisions (torch dtypes of the network); the backends also accept int8 (TensorRT)
PRECISIONS = ("fp32", "fp16", "bf16")
BACKEND_PRECISIONS = PRECISIONS + ("int8",)

#: execution backends of the neural engines (implemented in engines.backends)
BACKENDS = ("eager", "channels_last", "jit", "compile", "compile-cudagraphs", "onnxruntime",
            "tensorrt")
#: what --backend accepts: a backend, a torch backend with channels_last ("+cl"), or "auto"
BACKEND_CHOICES = BACKENDS + ("jit+cl", "compile+cl", "auto")
#: other spellings accepted for convenience
BACKEND_ALIASES = {"compiled": "compile", "torch.compile": "compile", "ort": "onnxruntime",
                   "onnx": "onnxruntime", "trt": "tensorrt", "torchscript": "jit"}


def canonical_backend(backend: str) -> str:
    """Backend name with aliases resolved ('compiled+cl' -> 'compile+cl')."""
    base, sep, flag = backend.partition("+")
    return BACKEND_ALIASES.get(base, base) + sep + flag


def default_window(name: str | None = None) -> int:
    """Engine ``name``'s default window; without a name, the largest default of any engine."""
    if name is None:
        return max(e.default_window for e in ENGINES.values())
    return ENGINES[name].default_window


def neural_engines() -> tuple[str, ...]:
    """The engines that run a trained network (the ones training and fine-tuning can make)."""
    return tuple(n for n, e in ENGINES.items() if e.needs_weights)


class WeightsArgError(argparse.ArgumentTypeError, ValueError):
    """A bad ``--weights ENGINE=PATH``: argparse prints its message, callers may catch ValueError."""


def parse_weights_arg(text: str) -> tuple[str, str]:
    """``"convgru=runs/x.pt"`` -> ``("convgru", "runs/x.pt")``; the file must exist."""
    name, sep, path = (part.strip() for part in text.partition("="))
    if not sep or not name or not path:
        raise WeightsArgError(f"--weights must look like ENGINE=PATH, got {text!r}")
    if not Path(path).is_file():
        raise WeightsArgError(f"--weights {name}: no such file {path!r}")
    return name.lower(), path
