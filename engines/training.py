"""`livesr train`: train the ConvGRU or ConvLSTM engine on simulated blinking movies.

Seeded and resumable (model + optimiser + step + RNG in each checkpoint; the data stream is
indexed by step, so a resumed run sees the same batches it would have seen). The final
weights file carries a JSON config that rebuilds the exact model (see nn_common.save_weights).

Where it writes: a run folder (``--out``, default ``<user data dir>/livesr/runs/<model>-<time>``)
with log.jsonl, ckpt.pt and the weights ``<model>.pt`` (or ``--weights-out``). It never
writes into the installed package: the shipped weights change only with
``--overwrite-shipped``, and an engine uses new weights only when asked (``--weights``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines import engine_module
from engines.data import DataConfig, SampleStream, heldout_set
from engines.metrics import pearson_r
from engines.nn_common import (
    WEIGHTS_DIR,
    NormConfig,
    combined_loss,
    decode_output,
    encode_target,
    normalise_with_scale,
    save_weights,
    trailing_mean,
)
from engines.registry import DEFAULT_NETWORK, ENGINES, neural_engines


@dataclass
class LossConfig:
    """Loss on the network representation a = sqrt(target) / s (nn_common.combined_loss)."""

    mse_weight: float = 1.0      # conditional mean: honest where the data are ambiguous
    l1_weight: float = 0.02      # pulls the many exact-zero pixels (nothing blinks) to zero
    pearson_weight: float = 0.0  # (1 - Pearson r) term: the evaluation's headline metric
    image_floor: float = 0.02    # terms relative per image (0: plain MSE), see combined_loss


@dataclass
class TrainConfig:
    model: str = DEFAULT_NETWORK      # a network of the registry (neural_engines())
    preset: str = "cpu"               # cpu (shared 2-core CPU) | gpu (TRAIN_PRESETS)
    steps: int = 1500
    batch: int = 8
    lr: float = 1e-3
    lr_final: float = 1e-4            # cosine decay from lr to lr_final over the run
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    threads: int = 1                  # 1: with a shared, busy CPU, 2 OpenMP threads run ~10x slower
    workers: int = 1                  # background data processes
    ckpt_every: int = 100
    eval_every: int = 100
    eval_n: int = 16
    warmup_loss: int = 10             # ConvLSTM: frames before the loss starts
    hidden: int | None = None         # override the architecture's hidden channels
    out: str = ""                     # run folder; "" = default_run_dir(model)
    weights_out: str | None = None    # default <out>/<model>.pt
    overwrite_shipped: bool = False   # allow writing into engines/weights (shipping new weights)
    resume: str | None = None
    max_minutes: float | None = None  # wall-clock budget: the LR schedule follows whichever of
                                      # steps / time is further along, and training stops there
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)


# The presets are each network's TRAIN_PRESETS (in its own module): cpu = a shared 2-core CPU,
# one torch thread + one data process (run hours with --max-minutes); gpu = one GPU on a
# 16-core host, where the simulator, not the GPU, bounds the step rate (per process ~14 48-px
# ConvGRU samples/s, ~4 40-frame ConvLSTM sequences/s: benchmarks/bench_data.py), hence 48-px
# patches and 14 processes. Patches hold a ring, a punctum cluster or a 3.5 px FWHM PSF.
PRESET_ALIASES = {"small": "cpu", "full": "gpu"}  # the names of the first presets


def _build(cfg: TrainConfig):
    """A fresh network and its architecture (the network's own ``training_net``)."""
    if cfg.model not in neural_engines():
        raise ValueError(f"unknown model {cfg.model!r} ({', '.join(neural_engines())})")
    return engine_module(cfg.model).training_net(frames=cfg.data.frames, hidden=cfg.hidden)


def _per_frame(model_name: str) -> bool:
    """A stateful network (ConvLSTM) has one output per frame; a window network one per window."""
    return ENGINES[model_name].stateful


def predict(model, x: torch.Tensor, norm: NormConfig, model_name: str, decode_from: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw frames (B, T, H, W) -> raw network outputs a and the scales that map them back:
    ConvGRU (B, uH, uW) and (B,) (mean over the window); ConvLSTM (B, T', uH, uW) and
    (B, T') (trailing mean over the arch's warm-up), for frames decode_from.. only."""
    xn, scale = normalise_with_scale(x, norm)
    if not _per_frame(model_name):
        return model(xn)[:, 0], scale.mean(dim=1)
    out = model(xn, decode_from=decode_from)[0]
    return out, trailing_mean(scale, model.cfg.warmup)[:, decode_from:]


def compute_loss(model, x, y, cfg: TrainConfig, norm: NormConfig) -> torch.Tensor:
    """Loss between the network output and the target (ADU^2) in the network representation."""
    kw = asdict(cfg.loss)
    if not _per_frame(cfg.model):
        a, scale = predict(model, x, norm, cfg.model)
        return combined_loss(a, encode_target(y, scale), **kw)
    s = cfg.warmup_loss
    a, scale = predict(model, x, norm, cfg.model, decode_from=s)
    return combined_loss(a, encode_target(y[:, s:], scale), **kw)


@torch.no_grad()
def validation_metrics(model, val: tuple[np.ndarray, np.ndarray], cfg: TrainConfig,
                       norm: NormConfig, device: torch.device) -> dict[str, float]:
    """On the held-out set: the training loss (a fixed set, so steps compare), and with
    outputs mapped back to ADU^2 as the engine does (ConvLSTM: its last frame, after the
    warm-up) the mean Pearson over scenes whose target has structure and, on zero-target
    scenes (static, empty), the mean output relative to the set's mean target level
    (0 = invents nothing)."""
    model.eval()
    x = torch.from_numpy(val[0]).to(device)
    loss = float(compute_loss(model, x, torch.from_numpy(val[1]).to(device), cfg, norm))
    a, scale = predict(model, x, norm, cfg.model, decode_from=x.shape[1] - 1)
    model.train()
    if _per_frame(cfg.model):
        a, scale, tgt = a[:, -1], scale[:, -1], val[1][:, -1]
    else:
        tgt = val[1]
    out = decode_output(a, scale).cpu().numpy()
    has = tgt.reshape(len(tgt), -1).max(1) > 0
    level = float(tgt[has].mean()) if has.any() else 1.0
    rs = [pearson_r(o, t, if_constant=0.0) for o, t in zip(out[has], tgt[has], strict=True)]
    return {"pearson": float(np.mean(rs)) if has.any() else float("nan"),
            "zero_level": float(out[~has].mean() / level) if (~has).any() else float("nan"),
            "loss": loss}


def evaluate(model, val: tuple[np.ndarray, np.ndarray], cfg: TrainConfig, norm: NormConfig,
             device: torch.device) -> float:
    """Mean held-out Pearson (see validation_metrics)."""
    return validation_metrics(model, val, cfg, norm, device)["pearson"]


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def _progress(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    frac = step / max(cfg.steps, 1)
    if cfg.max_minutes:
        frac = max(frac, elapsed_s / (60.0 * cfg.max_minutes))
    return min(frac, 1.0)


def _lr_at(frac: float, cfg: TrainConfig) -> float:
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * frac))


def default_run_dir(model: str) -> Path:
    """``<user data dir>/livesr/runs/<model>-<UTC time>``: outside the package and the repo."""
    import platformdirs

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path(platformdirs.user_data_dir("livesr")) / "runs" / f"{model}-{stamp}"


def output_paths(cfg: TrainConfig) -> tuple[Path, Path]:
    """(run folder, final weights file); ValueError for a path inside the shipped weights."""
    out = Path(cfg.out) if cfg.out else default_run_dir(cfg.model)
    final = Path(cfg.weights_out) if cfg.weights_out else out / f"{cfg.model}.pt"
    if not cfg.overwrite_shipped:
        for what, path in (("--out", out), ("--weights-out", final)):
            refuse_shipped(what, path, "pass --overwrite-shipped to ship new weights")
    return out, final


def refuse_shipped(what: str, path: Path, alternative: str = "") -> None:
    """ValueError if `path` is (inside) the installed package's weights folder: every later
    run would silently use what is written there."""
    shipped = WEIGHTS_DIR.resolve()
    resolved = Path(path).resolve()
    if resolved == shipped or shipped in resolved.parents:
        raise ValueError(f"{what} {path} is inside the shipped weights ({shipped}); every later "
                         "run would silently use it. Write elsewhere and load it with --weights"
                         + (f", or {alternative}" if alternative else ""))


def train(cfg: TrainConfig) -> Path:
    """Run training; returns the path of the final weights file."""
    from tqdm import tqdm

    cfg.data = dataclasses.replace(cfg.data)  # validates ranges set by presets and flags
    out, final = output_paths(cfg)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("unavailable: --device cuda but torch sees no GPU")
    out.mkdir(parents=True, exist_ok=True)
    print(f"run folder {out}; final weights {final}", flush=True)
    norm = NormConfig()
    model, arch = _build(cfg)
    # channels_last: oneDNN convolutions with few channels run ~5x faster on CPU
    model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    step = 0
    elapsed0 = 0.0  # training seconds before this run (resume)
    if cfg.resume:
        ck = torch.load(cfg.resume, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step = int(ck["step"])
        elapsed0 = float(ck.get("elapsed_s", 0.0))
        _set_rng_state(ck["rng"])
        print(f"resumed from {cfg.resume} at step {step}", flush=True)
    step0 = step
    n_params = sum(p.numel() for p in model.parameters())
    val = heldout_set(cfg.eval_n, cfg.data)
    stream = SampleStream(cfg.data, cfg.batch, seed=cfg.seed, start_batch=step,
                          workers=cfg.workers)
    log = open(out / "log.jsonl", "a")
    t0 = time.time()
    best = -1.0
    ema = None

    def checkpoint(name: str = "ckpt.pt") -> None:
        tmp = out / (name + ".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "rng": _rng_state(), "config": _jsonable(cfg),
                    "elapsed_s": elapsed0 + time.time() - t0}, tmp)
        tmp.replace(out / name)
        export(val_pearson=None)  # keep a usable weights file at every checkpoint

    def export(val_pearson: float | None) -> None:
        training = {
            **_jsonable(cfg),
            "final_step": step,
            "train_seconds": round(elapsed0 + time.time() - t0, 1),
            "val_pearson": val_pearson,
            "n_params": n_params,
            "device": str(device) + (f" ({torch.get_num_threads()} thread(s), "
                                     f"{platform.processor() or platform.machine()})"
                                     if device.type == "cpu" else ""),
            "torch": str(torch.__version__),
        }
        cpu = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format)
        save_weights(final, cpu, model_name=cfg.model, arch=arch, norm=norm, training=training)

    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.model}", mininterval=5,
               file=sys.stdout)
    try:
        while _progress(step, elapsed0 + time.time() - t0, cfg) < 1.0:
            x_np, y_np = next(stream)
            x = torch.from_numpy(x_np).to(device)
            y = torch.from_numpy(y_np).to(device)
            for g in opt.param_groups:
                g["lr"] = _lr_at(_progress(step, elapsed0 + time.time() - t0, cfg), cfg)
            loss = compute_loss(model, x, y, cfg, norm)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            lv = float(loss.detach())
            ema = lv if ema is None else 0.98 * ema + 0.02 * lv
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}")
            rec = {"step": step, "loss": lv, "lr": opt.param_groups[0]["lr"],
                   "t": round(time.time() - t0, 1)}
            if step - step0 == BUDGET_PROBE_STEPS:
                bar.write(_budget_line(step, step0, time.time() - t0, elapsed0, cfg))
            if step % cfg.eval_every == 0 or step == cfg.steps:
                vm = validation_metrics(model, val, cfg, norm, device)
                rec.update({f"val_{k}": v for k, v in vm.items()})
                bar.write(f"step {step} loss {ema:.4f} val_loss {vm['loss']:.4f} val_pearson "
                          f"{vm['pearson']:.4f} zero_level {vm['zero_level']:.3f} "
                          f"({rec['t']:.0f} s)")
                if rec["val_pearson"] > best:
                    best = rec["val_pearson"]
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                checkpoint()
        checkpoint()  # the final state, also when the time budget ended the run
    finally:
        bar.close()
        stream.close()
        log.close()
    train_s = time.time() - t0
    vp = evaluate(model, val, cfg, norm, device)
    export(val_pearson=vp)
    print(f"wrote {final} ({final.stat().st_size / 1e6:.2f} MB), step {step}, val Pearson "
          f"{vp:.4f}, {train_s:.0f} s this run; use it with --weights {final}", flush=True)
    return final


BUDGET_PROBE_STEPS = 20  # steps timed before the time budget is printed


def _budget_line(step: int, step0: int, run_s: float, elapsed0: float, cfg: TrainConfig) -> str:
    """Measured speed and what the run will cost: the printed time budget."""
    per = run_s / max(step - step0, 1)
    left = max(cfg.steps - step, 0) * per
    line = (f"time budget: {per:.2f} s/step measured over {step - step0} steps; "
            f"{cfg.steps} steps need ~{(elapsed0 + run_s + left) / 60:.0f} min in all "
            f"(~{left / 60:.0f} min left)")
    if cfg.max_minutes:
        reach = step + max(cfg.max_minutes * 60 - elapsed0 - run_s, 0) / per
        line += f"; --max-minutes {cfg.max_minutes:g} stops it near step {min(reach, cfg.steps):.0f}"
    return line


def _jsonable(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    return json.loads(json.dumps(d, default=str))


def _merge(obj, overrides: dict):
    for k, v in overrides.items():
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur) and isinstance(v, dict):
            _merge(cur, v)
        else:
            setattr(obj, k, v)
    return obj


def config_from_flags(flags: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of `livesr train` (realtime/cli_tools.py): the preset, then each flag given."""
    preset = PRESET_ALIASES.get(flags["preset"], flags["preset"])
    cfg = TrainConfig(model=flags["model"], preset=preset)
    _merge(cfg, engine_module(flags["model"]).TRAIN_PRESETS[preset])
    if preset == "gpu":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    simple = {"steps": "steps", "batch": "batch", "lr": "lr", "lr_final": "lr_final",
              "hidden": "hidden", "out": "out", "weights_out": "weights_out",
              "resume": "resume", "seed": "seed", "device": "device", "threads": "threads",
              "workers": "workers", "ckpt_every": "ckpt_every", "eval_every": "eval_every",
              "max_minutes": "max_minutes", "overwrite_shipped": "overwrite_shipped"}
    for a, k in simple.items():
        v = flags.get(a)
        if v is not None and v is not False:
            setattr(cfg, k, v)
    if flags.get("patch") is not None:
        cfg.data.size = flags["patch"]
    if flags.get("frames") is not None:
        cfg.data.frames = flags["frames"]
    for a in ("mse_weight", "l1_weight", "image_floor", "pearson_weight"):
        v = flags.get(a)
        if v is not None:
            setattr(cfg.loss, a, v)
    if flags.get("out") is None:
        cfg.out = str(default_run_dir(cfg.model))
    return cfg


def run_cli(cfg: TrainConfig) -> int:
    """`livesr train`: refuse an output that may not be written (exit 2), else print the config and train."""
    try:
        output_paths(cfg)
    except ValueError as e:
        print(f"livesr train: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(_jsonable(cfg)), flush=True)
    train(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m engines.training ARGS` = `livesr train ARGS`."""
    from realtime.cli import main as livesr

    return livesr(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
