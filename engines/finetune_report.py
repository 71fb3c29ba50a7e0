"""What fine-tuning changed: held-out agreement with the long-window SOFI, the forgetting
check on simulated scenes, and the before/after figure.

Why these numbers: the user's question is "does the network now show my sample as the SOFI
of the whole recording does, on pixels it never trained on?" (held-out Pearson, before and
after, with the live 20-frame SOFI as a reference) and "has it become worse on everything
else?" (the same simulated evaluation as `livesr evaluate`, for the base and the new weights).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engines.evaluation import SCORE_BORDER
from engines.finetune_data import FieldPairs, static_twin
from engines.metrics import pearson

if TYPE_CHECKING:
    from torch import nn

    from engines.base import Engine
    from engines.nn_common import NetworkEngine, NormConfig

__all__ = ["Agreement", "forgetting_check", "heldout_agreement", "invented_level",
           "network_engine", "sofi_agreement", "worse_scores", "write_figure"]

#: a simulated score this much worse than the base's counts as forgetting
FORGETTING_TOLERANCE = 0.05
FORGETTING_SCENES = dict(size=48, n=1, n_wide=6, n_zero=3)


@dataclass
class Agreement:
    """Mean Pearson over held-out windows, the per-window values and one example image."""

    pearson: float
    per_window: list[float]
    example: np.ndarray | None = field(default=None, repr=False)  # first window, first field

    def as_dict(self) -> dict[str, Any]:
        return {"pearson": round(self.pearson, 4), "windows": len(self.per_window),
                "per_window": [round(v, 4) for v in self.per_window]}


def score(out: np.ndarray, target: np.ndarray) -> float:
    """Pearson of an output with the long-window SOFI, the border left out (as `evaluate`)."""
    b = 2 * SCORE_BORDER  # output pixels
    r = pearson(out[b:-b, b:-b], target[b:-b, b:-b], align=False)
    return r if np.isfinite(r) else 0.0


def window_starts(n_total: int, n: int, count: int) -> list[int]:
    """`count` window starts spread evenly over the recording."""
    return sorted({int(v) for v in np.linspace(0, n_total - n, count).round()})


def network_engine(model_name: str, model: nn.Module, norm: NormConfig, device: str) -> NetworkEngine:
    """An engine around a copy of `model` (the live engine class, so what is scored is what the
    user will see; the copy keeps the training model's mode and memory format)."""
    from engines import engine_module

    m = copy.deepcopy(model).to("cpu")
    return engine_module(model_name).engine_from_model(m, norm, device=device)


def eval_frames(engine: Engine) -> int:
    """Frames per scored output: the ConvGRU's window; the ConvLSTM its warm-up and as many
    again (it is scored on its output after 2x warm-up, from zero state)."""
    return int(engine.window) * (2 if getattr(engine, "stateful", False) else 1)


def heldout_agreement(engine: Engine, fields: list[FieldPairs], windows: int) -> Agreement:
    """The engine on `windows` windows of each held-out part against that part's long SOFI."""
    n = eval_frames(engine)
    per, example = [], None
    for f in fields:
        for t0 in window_starts(f.held_frames.shape[0], n, windows):
            out = engine.reconstruct(f.held_frames[t0:t0 + n])
            per.append(score(out, f.held_target))
            if example is None:
                example = out
    return Agreement(float(np.mean(per)), per, example)


def invented_level(engine: Engine, fields: list[FieldPairs], windows: int) -> float:
    """Mean output on the static twins of the held-out windows over the mean output on the
    real windows (the evaluation's zero-target "level": 0 = invents nothing, 1 = cannot tell
    a blinking sample from a static one)."""
    n, b = eval_frames(engine), 2 * SCORE_BORDER
    real = twin = 0.0
    for k, f in enumerate(fields):
        fake = static_twin(f.held_frames, np.random.default_rng([k, 0x7419]))
        for t0 in window_starts(f.held_frames.shape[0], n, windows):
            real += float(engine.reconstruct(f.held_frames[t0:t0 + n])[b:-b, b:-b].mean())
            twin += float(engine.reconstruct(fake[t0:t0 + n])[b:-b, b:-b].mean())
    return twin / real if real > 0 else float("nan")


def sofi_agreement(fields: list[FieldPairs], windows: int, window: int,
                   sofi_options: dict[str, Any], n_frames: int) -> Agreement:
    """The live SOFI (a `window`-frame window) on the same held-out windows, for reference."""
    from engines.sofi import SofiEngine

    eng = SofiEngine(window=window, **sofi_options)
    per, example = [], None
    for f in fields:
        for t0 in window_starts(f.held_frames.shape[0], n_frames, windows):
            out = eng.reconstruct(f.held_frames[t0 + n_frames - window:t0 + n_frames])
            per.append(score(out, f.held_target))
            if example is None:
                example = out
    return Agreement(float(np.mean(per)), per, example)


def forgetting_check(model_name: str, weights: dict[str, Path], *, device: str,
                     threads: int, scenes: dict[str, Any] | None = None) -> dict[str, Any]:
    """`livesr evaluate` on a small simulated hold-out set (thesis SNR classes, the wide
    training domain, zero-target scenes; `scenes`: EvaluationConfig sizes, default
    FORGETTING_SCENES) for each labelled weights file ("base", "new")."""
    from engines.evaluation import EvaluationConfig, evaluate

    out: dict[str, Any] = {"scenes": None}
    for label, path in weights.items():
        cfg = EvaluationConfig(**(scenes or FORGETTING_SCENES), engines=(model_name,),
                               weights={model_name: str(path)}, device=device, threads=threads,
                               figure=False, progress=False)
        res = evaluate(cfg)
        rows = {(r["set"], r["class"]): r for r in res["summary"] if r["engine"] == model_name}
        row = next(e for e in res["engines"] if e["engine"] == model_name)
        if row["status"] != "ok":
            out[label] = {"status": row["status"]}
            continue
        out["scenes"] = len(res["scenes"])
        out[label] = {"thesis_pearson": _mean(rows.get(("thesis", "all")), "pearson"),
                      "wide_pearson": _mean(rows.get(("wide", "all")), "pearson"),
                      "zero_level": _mean(rows.get(("zero", "all")), "level")}
    out["worse"] = worse_scores(out.get("base", {}), out.get("new", {}))
    return out


def worse_scores(base: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The simulated scores on which `new` is worse than `base` by more than the tolerance
    (lower Pearson; a higher output on zero-target scenes, i.e. more invented signal)."""
    worse = [k for k in ("thesis_pearson", "wide_pearson")
             if _num(base.get(k)) and _num(new.get(k)) and new[k] < base[k] - FORGETTING_TOLERANCE]
    if _num(base.get("zero_level")) and _num(new.get("zero_level")) \
            and new["zero_level"] > base["zero_level"] + FORGETTING_TOLERANCE:
        worse.append("zero_level")
    return worse


def _mean(row: dict[str, Any] | None, key: str) -> float | None:
    v = (row or {}).get(key, {}).get("mean")
    return round(float(v), 4) if v is not None and np.isfinite(v) else None


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and np.isfinite(v)


def write_figure(path: Path, field0: FieldPairs, images: dict[str, np.ndarray | None],
                 numbers: dict[str, float], title: str) -> None:
    """The held-out part of the first recording: widefield mean, live SOFI, the base and the
    fine-tuned network on the same window, and the long-window SOFI they are scored against
    (an image that is None, no held-out window scored, gets no panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, np.ndarray, float | None]] = [("mean of all frames", field0.held_frames.mean(0), None)]
    panels += [(k, v, numbers.get(k)) for k, v in images.items() if v is not None]
    panels.append(("target: SOFI of all frames", field0.held_target, None))
    h, w = field0.held_target.shape
    along_x = w < h  # a tall stripe: panels side by side
    n = len(panels)
    size = (2.2 * n, 2.2 * h / w + 1.2) if along_x else (6.0, 1.6 * n * h / w + 1.2)
    fig, axes = plt.subplots(1 if along_x else n, n if along_x else 1, figsize=size, squeeze=False)
    for ax, (name, img, r) in zip(axes.ravel(), panels, strict=True):
        lo, hi = np.percentile(img, [1, 99.7])
        ax.imshow(img, cmap="magma", vmin=lo, vmax=hi if hi > lo else lo + 1)
        ax.set_title(name + ("" if r is None else f"\nr = {r:.3f}"), fontsize=8)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
