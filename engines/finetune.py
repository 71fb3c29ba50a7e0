"""`livesr finetune`: adapt a network to your sample with recordings of it held still.

    livesr finetune cell01.ome.tif [cell02.ome.zarr ...] --model convgru --out cell_convgru.pt

Training pairs (engines.finetune_data): 20-frame windows of the recording in (ConvLSTM:
sequences), the SOFI of ALL its frames out (bleaching, PSF and lag handled as by the `sofi`
engine, in the networks' units). A stripe of each field is held out and never trained on;
the agreement of the base and the fine-tuned network with the long-window SOFI there is the
result (terminal, ``<out>.report.png``, ``<out>.report.json``), next to a check on simulated
scenes that the network did not get worse elsewhere (engines.finetune_report).

Guards: a recording shorter than MIN_FRAMES frames, or whose blinking check fails, is refused
in one sentence (a long SOFI of it is not a super-resolved target); a sample that moved
(first vs last 100-frame means) is warned about. Seeded and resumable (``--resume`` continues
from ``<out>.ckpt``; batch k depends only on the seed and k). It writes only ``--out`` and its
side files, never into the installed package; the weights file records its provenance
(source recordings with sizes and SHA-256, frames, steps, before/after numbers, base
weights), shown briefly wherever the weights are loaded (``--weights``, the GUI).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines import engine_module
from engines.finetune_data import (
    DRIFT_WARN_PX,
    FieldPairs,
    PairSampler,
    build_field,
    drift_px,
)
from engines.nn_common import NormConfig, WeightsError, is_legacy, save_weights
from engines.registry import DEFAULT_NETWORK, ENGINES, REFERENCE_ENGINE, default_window, neural_engines
from engines.training import TrainConfig, _lr_at, _progress, compute_loss, refuse_shipped
from realtime.config import SofiOptions

MIN_FRAMES = 500  # fewer frames give a long-window SOFI too noisy to be a target
BLINK_CHECK_FRAMES = 500  # frames the blinking check looks at (the first ones)
CONVLSTM_SEQUENCE = 32  # frames per ConvLSTM training sequence (as `livesr train`'s cpu preset)
CONVLSTM_WARMUP_LOSS = 8
INVENTION_TOLERANCE = 0.1  # static-twin level this much above the base's: warned about
PROBE_BATCH = 2**40  # batch index of the throwaway step that times the budget (never trained)


class RefusedError(ValueError):
    """An input fine-tuning cannot learn from; the text is the one sentence for the user."""


@dataclass
class FinetuneConfig:
    """One fine-tuning run; the defaults take a few minutes on a CPU for one 128 px recording."""

    recordings: tuple[str, ...]
    out: str
    model: str = DEFAULT_NETWORK
    base: str | None = None  # --from: weights to start from (None: the shipped ones)
    steps: int = 300
    minutes: float | None = None  # wall-clock budget: the LR anneals to it, training stops there
    patch: int = 64  # input pixels
    batch: int = 4
    lr: float = 3e-4
    lr_final: float = 1e-5
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # torch threads (default: half the cores, 1-4)
    resume: bool = False
    holdout: float = 0.25
    static_share: float = 0.25  # training samples that are static twins with a zero target
    eval_windows: int = 8  # held-out windows scored per recording
    forgetting_check: bool = True
    ckpt_every: int = 25
    sofi: SofiOptions = field(default_factory=SofiOptions)
    events: bool = False  # JSON lines on stdout (for the GUI) instead of text and a bar

    def __post_init__(self) -> None:
        if self.model not in neural_engines():
            raise ValueError(f"--model must be {' or '.join(neural_engines())}, got {self.model!r}")
        if not self.recordings:
            raise ValueError("give at least one recording")
        if not self.out:
            raise ValueError("--out WEIGHTS is required")
        for name, lo in (("steps", 1), ("patch", 8), ("batch", 1), ("eval_windows", 1),
                         ("ckpt_every", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}")
        if not 0.0 <= self.static_share <= 0.75:
            raise ValueError(f"--static-share must be in [0, 0.75], got {self.static_share}")
        if not 0.05 <= self.holdout <= 0.5:
            raise ValueError(f"--holdout must be in [0.05, 0.5], got {self.holdout}")
        problems = self.sofi.problems()
        if problems:
            raise ValueError("; ".join(problems))
        refuse_shipped("--out", Path(self.out))

    @property
    def window(self) -> int:
        """Frames per training sample."""
        return CONVLSTM_SEQUENCE if ENGINES[self.model].stateful else default_window(self.model)


def side_files(out: str | Path) -> dict[str, Path]:
    """The files written next to the weights: checkpoint, report figure and numbers."""
    p = Path(out)
    stem = p.with_suffix("") if p.suffix else p
    return {"ckpt": Path(f"{stem}.ckpt"), "png": Path(f"{stem}.report.png"),
            "json": Path(f"{stem}.report.json")}


# --------------------------------------------------------------------------- output
class Reporter:
    """Text and a progress bar for a terminal, or one JSON object per line (``events``)."""

    def __init__(self, events: bool):
        self.events = events
        self._bar: Any = None
        self._last_event = 0.0

    def emit(self, event: str, **data: Any) -> None:
        if self.events:
            print(json.dumps({"event": event, **data}, default=_json_default), flush=True)

    def say(self, text: str) -> None:
        if self.events:
            self.emit("log", text=text)
        elif self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def warn(self, text: str) -> None:
        if self.events:
            self.emit("warning", text=text)
        else:
            print(f"livesr finetune: warning: {text}", file=sys.stderr, flush=True)

    def stage(self, name: str, text: str) -> None:
        self.emit("stage", stage=name)
        if not self.events:
            self.say(text)

    def start_bar(self, total: int, initial: int) -> None:
        if not self.events:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="finetune", unit="step",
                             mininterval=2, file=sys.stderr)

    def step(self, step: int, total: int, loss: float, elapsed: float, frac: float) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4f}")
        now = time.monotonic()
        if self.events and (now - self._last_event > 0.5 or step == total):
            self._last_event = now
            eta = elapsed * (1 - frac) / frac if frac > 0 else None
            self.emit("step", step=step, steps=total, loss=round(loss, 5),
                      elapsed_s=round(elapsed, 1), progress=round(frac, 4),
                      eta_s=None if eta is None else round(eta, 1))

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON: {type(o).__name__}")


# --------------------------------------------------------------------------- inputs
def load_fields(cfg: FinetuneConfig, rep: Reporter) -> tuple[list[FieldPairs], list[dict], dict]:
    """Read every recording, apply the guards, split it and compute its targets.
    Returns the fields, each recording's provenance and the SOFI options used."""
    from acquisition.recordings import RecordingError, read_recording
    from engines.blinking import assess_blinking

    fields, sources, opts = [], [], {}
    for path in cfg.recordings:
        try:
            rec = read_recording(path)
        except RecordingError as e:
            raise RefusedError(str(e)) from None
        name = Path(path).name
        t, h, w = rec.shape
        if t < MIN_FRAMES:
            raise RefusedError(f"{name} has {t} frames; fine-tuning needs at least {MIN_FRAMES} "
                               "frames of a fixed sample (its SOFI of all frames is the target): "
                               "record longer")
        check = assess_blinking(rec.frames[:BLINK_CHECK_FRAMES])
        if not check.ok:
            raise RefusedError(f"{name} fails the blinking check ({check.message.rstrip('.')}); "
                               "a target computed from it would teach the network noise or "
                               "static fluorescence")
        dy, dx = drift_px(rec.frames)
        moved = math.hypot(dy, dx)
        if moved > DRIFT_WARN_PX:
            rep.warn(f"{name}: the sample moved by {moved:.1f} px (dy {dy:+.1f}, dx {dx:+.1f}) "
                     "between the first and the last 100 frames; the SOFI of all frames is "
                     "blurred by that much. Fine-tune on a fixed sample, or register the movie first")
        source = "from file metadata" if rec.pixel_size_um else None
        opts = cfg.sofi.engine_options(rec.pixel_size_um, source)
        if not rec.pixel_size_um and cfg.sofi.pixel_size_um is None:
            rep.warn(f"{name} does not say its pixel size; SOFI assumes 0.1 um "
                     "(give --pixel-size-um)")
        try:
            f = build_field(name, rec.frames, opts, holdout=cfg.holdout)
        except ValueError as e:
            raise RefusedError(f"{name}: {e}") from None
        fields.append(f)
        sources.append({**rec.provenance(), "blinking_local_correlation":
                        round(check.local_correlation, 4), "drift_px": [round(dy, 2), round(dx, 2)],
                        "train_region": f.train_region.as_dict(),
                        "held_out_region": f.held_region.as_dict(),
                        "target": {k: f.target_info.get(k) for k in (
                            "psf_fwhm_px", "psf_source", "distance_fwhm_px", "psf_fit",
                            "pixel_size_um", "pixel_size_source", "lag", "lag_reason",
                            "bleach_correction")},
                        "level_first_last": [round(float(f.train_level[0]), 3),
                                             round(float(f.train_level[-1]), 3)]})
        rep.say(f"{name}: {t} frames of {h}x{w}, blinking check {check.local_correlation:.2f}, "
                f"drift {moved:.1f} px; training part {_shape(f.train_region.shape)}, held out "
                f"{_shape(f.held_region.shape)}; target PSF {f.target_info.get('distance_fwhm_px')} "
                f"px ({f.target_info.get('psf_fit')}), lag {f.target_info.get('lag')}, bleaching "
                f"level {f.train_level[0]:.2f} -> {f.train_level[-1]:.2f}")
    return fields, sources, opts


def _shape(s: tuple[int, int]) -> str:
    return f"{s[0]}x{s[1]}"


def load_base(cfg: FinetuneConfig) -> tuple[torch.nn.Module, Any, NormConfig, dict, Path]:
    """The network to start from: model, architecture, normalisation, config, file."""
    module = engine_module(cfg.model)
    path = Path(cfg.base) if cfg.base else module.DEFAULT_WEIGHTS
    model, norm, config = module.load_model(path)
    return model, dataclasses.replace(model.cfg), norm, config, path


def resolve_device(name: str) -> torch.device:
    from engines.base import resolve_device as resolve

    try:
        return resolve(name)
    except (RuntimeError, ValueError) as e:
        raise RefusedError(f"unavailable: {e}") from None


# --------------------------------------------------------------------------- run
def finetune(cfg: FinetuneConfig, rep: Reporter | None = None) -> dict[str, Any]:
    """Run everything; returns the report (also written to ``<out>.report.json``)."""
    from acquisition.recordings import file_fingerprint
    from engines.finetune_report import (
        forgetting_check,
        heldout_agreement,
        invented_level,
        network_engine,
        sofi_agreement,
        write_figure,
    )

    rep = rep or Reporter(cfg.events)
    t_start = time.time()
    files = side_files(cfg.out)
    out = Path(cfg.out)
    threads = cfg.threads or max(1, min(4, (os.cpu_count() or 2) // 2))
    torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    rep.stage("reading", f"reading {len(cfg.recordings)} recording(s) and computing the "
                         "long-window SOFI targets ...")
    fields, sources, sofi_opts = load_fields(cfg, rep)
    model, arch, norm, base_config, base_path = load_base(cfg)
    base_bytes, base_sha = file_fingerprint(base_path)
    if is_legacy(base_config):
        rep.warn(f"the base weights {base_path.name} are legacy (trained towards the old target, "
                 "not the cumulant): fine-tuning re-targets them; expect poor 'before' numbers")
    try:
        sampler = PairSampler(fields, patch=cfg.patch, frames=cfg.window,
                              per_frame=ENGINES[cfg.model].stateful, seed=cfg.seed,
                              static_share=cfg.static_share)
    except ValueError as e:
        raise RefusedError(str(e)) from None
    if sampler.patch < cfg.patch:
        rep.warn(f"--patch {cfg.patch} does not fit the training part; using {sampler.patch} px")
    tcfg = TrainConfig(model=cfg.model, steps=cfg.steps, lr=cfg.lr, lr_final=cfg.lr_final,
                       max_minutes=cfg.minutes, seed=cfg.seed, device=str(device),
                       warmup_loss=CONVLSTM_WARMUP_LOSS)
    fingerprint = {"model": cfg.model, "base_sha256": base_sha, "seed": cfg.seed,
                   "recordings": [s["sha256"] for s in sources], "patch": sampler.patch,
                   "batch": cfg.batch, "holdout": cfg.holdout, "lr": cfg.lr,
                   "static_share": cfg.static_share}

    resume = _read_checkpoint(files["ckpt"], fingerprint) if cfg.resume else None
    _print_budget(cfg, rep, fields, sampler, model, norm, tcfg, device, files,
                  int(resume["step"]) if resume else 0)

    # ---- before ----
    rep.stage("before", "scoring the base weights on the held-out part ...")
    base_engine = network_engine(cfg.model, model, norm, str(device))
    before = heldout_agreement(base_engine, fields, cfg.eval_windows)
    before_invented = invented_level(base_engine, fields, cfg.eval_windows)
    n_eval = int(base_engine.window) * (2 if ENGINES[cfg.model].stateful else 1)
    live_sofi = sofi_agreement(fields, cfg.eval_windows, default_window(REFERENCE_ENGINE), sofi_opts, n_eval)
    base_example = before.example

    # ---- training ----
    # works at runtime; torch's stubs lack Module.to(memory_format=...)
    model.to(device, memory_format=torch.channels_last).train()  # type: ignore[call-overload]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step, elapsed0 = 0, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        step, elapsed0 = int(resume["step"]), float(resume["elapsed_s"])
        rep.say(f"resumed from {files['ckpt']} at step {step}")
    rep.stage("training", f"fine-tuning {cfg.model} from {base_path.name} ...")
    rep.start_bar(cfg.steps, step)
    t0 = time.time()
    loss_ema = float("nan")
    try:
        while _progress(step, elapsed0 + time.time() - t0, tcfg) < 1.0:
            x, y = sampler.batch(step, cfg.batch)
            frac = _progress(step, elapsed0 + time.time() - t0, tcfg)
            for g in opt.param_groups:
                g["lr"] = _lr_at(frac, tcfg)
            loss = compute_loss(model, torch.from_numpy(x).to(device),
                                torch.from_numpy(y).to(device), tcfg, norm)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            opt.step()
            step += 1
            lv = float(loss.detach())
            loss_ema = lv if not math.isfinite(loss_ema) else 0.9 * loss_ema + 0.1 * lv
            elapsed = elapsed0 + time.time() - t0
            rep.step(step, cfg.steps, loss_ema, elapsed, _progress(step, elapsed, tcfg))
            if step % cfg.ckpt_every == 0:
                _checkpoint(files["ckpt"], model, opt, step, elapsed, fingerprint)
    finally:
        rep.close_bar()
    train_s = elapsed0 + time.time() - t0
    _checkpoint(files["ckpt"], model, opt, step, train_s, fingerprint)
    model.eval()

    # ---- after ----
    rep.stage("after", "scoring the fine-tuned weights on the held-out part ...")
    new_engine = network_engine(cfg.model, model, norm, str(device))
    after = heldout_agreement(new_engine, fields, cfg.eval_windows)
    after_invented = invented_level(new_engine, fields, cfg.eval_windows)
    provenance = {
        "kind": "finetune",
        "base_weights": {"path": str(base_path.resolve()), "name": base_path.name,
                         "bytes": base_bytes, "sha256": base_sha,
                         "saved_utc": base_config.get("saved_utc"), "legacy": is_legacy(base_config),
                         "training": _brief_training(base_config.get("training") or {})},
        "recordings": sources,
        "frames": int(sum(f.n_frames for f in fields)),
        "steps": step, "batch": cfg.batch, "patch": sampler.patch, "frames_per_sample": cfg.window,
        "lr": cfg.lr, "lr_final": cfg.lr_final, "seed": cfg.seed, "holdout": cfg.holdout,
        "static_share": cfg.static_share,
        "device": str(device), "threads": threads, "train_seconds": round(train_s, 1),
        "torch": str(torch.__version__),
        "target": "SOFI of all frames of each part (engines.sofi, as the live engine), times "
                  "the relative cumulant level at the window's frames (bleaching)",
        "heldout_agreement": {"metric": "Pearson r with the SOFI of all frames of the held-out "
                                        "part, border of 6 output px left out",
                              "before": before.as_dict(), "after": after.as_dict(),
                              "live_sofi20": live_sofi.as_dict()},
        "static_twin_level": {"what": "mean output on the held-out part with nothing blinking "
                                      "(each pixel's mean + independent noise of its own SD) over "
                                      "the mean output on the real part; 0 = invents nothing",
                              "before": round(before_invented, 4), "after": round(after_invented, 4)},
    }
    save_weights(out, _cpu_copy(model), model_name=cfg.model, arch=arch, norm=norm,
                 training={"finetune": provenance})

    # ---- forgetting ----
    if cfg.forgetting_check:
        rep.stage("forgetting", "checking the base and the new weights on simulated scenes ...")
        provenance["forgetting_check"] = forgetting_check(
            cfg.model, {"base": base_path, "new": out}, device=str(device), threads=threads)
        save_weights(out, _cpu_copy(model), model_name=cfg.model, arch=arch, norm=norm,
                     training={"finetune": provenance})

    # ---- report ----
    gain = after.pearson - before.pearson
    report = {"weights": str(out), "model": cfg.model, "before": round(before.pearson, 4),
              "after": round(after.pearson, 4), "gain": round(gain, 4),
              "live_sofi20": round(live_sofi.pearson, 4),
              "static_twin_level": [round(before_invented, 4), round(after_invented, 4)],
              "steps": step,
              "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t_start, 1),
              "forgetting_check": provenance.get("forgetting_check"), "provenance": provenance,
              "files": {"weights": str(out), "png": str(files["png"]), "json": str(files["json"])}}
    # the title quotes the report's numbers so terminal, JSON and PNG agree to the digit
    title = (f"{cfg.model} held-out agreement with the SOFI of all frames: {report['before']:.3f} "
             f"(base {base_path.name}) -> {report['after']:.3f} (fine-tuned, {step} steps); "
             f"live SOFI-20 {report['live_sofi20']:.3f}")
    images = {"live SOFI (20 frames)": live_sofi.example, f"base {cfg.model}": base_example,
              f"fine-tuned {cfg.model}": after.example}
    write_figure(files["png"], fields[0], images,
                 {"live SOFI (20 frames)": live_sofi.per_window[0],
                  f"base {cfg.model}": before.per_window[0],
                  f"fine-tuned {cfg.model}": after.per_window[0]}, title)
    files["json"].write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    _print_result(rep, report, files)
    return report


def _brief_training(training: dict[str, Any]) -> dict[str, Any]:
    """What the base weights' own provenance says, without its nested history."""
    keys = ("final_step", "val_pearson", "preset", "steps", "train_seconds", "kind")
    brief = {k: training[k] for k in keys if k in training}
    if "finetune" in training:
        ft = training["finetune"]
        brief["finetuned_on"] = [r.get("name") for r in ft.get("recordings", [])]
    return brief


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    # works at runtime; torch's stubs lack Module.to(memory_format=...)
    return copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format)  # type: ignore[call-overload]


def _checkpoint(path: Path, model, opt, step: int, elapsed: float, fingerprint: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "elapsed_s": elapsed, "fingerprint": fingerprint}, tmp)
    tmp.replace(path)


def _read_checkpoint(path: Path, fingerprint: dict) -> dict:
    """The checkpoint a --resume continues from; RefusedError if there is none or it belongs
    to another run (other recordings, model, base weights or settings)."""
    if not path.is_file():
        raise RefusedError(f"--resume: no checkpoint {path} (start without --resume)")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck.get("fingerprint") != fingerprint:
        diff = sorted(k for k in fingerprint if ck.get("fingerprint", {}).get(k) != fingerprint[k])
        raise RefusedError(f"--resume: {path} belongs to another run (differs in {', '.join(diff)}); "
                           "resume with the same recordings, model, base weights and settings")
    return ck


def _print_budget(cfg: FinetuneConfig, rep: Reporter, fields: list[FieldPairs],
                  sampler: PairSampler, model, norm: NormConfig, tcfg: TrainConfig,
                  device: torch.device, files: dict[str, Path], step: int) -> None:
    """The time and size budget, with the step time measured on throwaway steps (the faster
    of two: the first pays one-off set-up)."""
    probe = copy.deepcopy(model).to(device, memory_format=torch.channels_last).train()
    x, y = sampler.batch(PROBE_BATCH, cfg.batch)
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    times = []
    for _ in range(2):
        t = time.perf_counter()
        compute_loss(probe, xt, yt, tcfg, norm).backward()
        times.append(time.perf_counter() - t)
    per_step = min(times)
    del probe
    mem_mb = sum(f.train_frames.nbytes + f.held_frames.nbytes for f in fields) / 1e6
    n_params = sum(p.numel() for p in model.parameters())
    left = max(cfg.steps - step, 0) * per_step
    budget = (f"budget: {len(fields)} recording(s), {sum(f.n_frames for f in fields)} frames "
              f"({mem_mb:.0f} MB in memory); {cfg.steps} steps (from {step}) x batch {cfg.batch} x "
              f"{cfg.window} frames of {sampler.patch}x{sampler.patch} px on {device}; "
              f"{per_step:.2f} s/step (measured) -> ~{left / 60:.1f} min of training")
    if cfg.minutes:
        budget += f", stopped at --minutes {cfg.minutes:g}"
    budget += (f"; writes {cfg.out} (~{n_params * 4 / 1e6:.1f} MB), {files['ckpt'].name} "
               f"(~{n_params * 12 / 1e6:.1f} MB), {files['png'].name}, {files['json'].name}")
    rep.emit("budget", seconds_per_step=round(per_step, 3), steps=cfg.steps, start_step=step,
             minutes=cfg.minutes, memory_mb=round(mem_mb, 1))
    rep.say(budget)


def _print_result(rep: Reporter, report: dict[str, Any], files: dict[str, Path]) -> None:
    lines = [f"held-out agreement with the SOFI of all frames (Pearson r): before "
             f"{report['before']:.3f}, after {report['after']:.3f} ({report['gain']:+.3f}); "
             f"the live 20-frame SOFI: {report['live_sofi20']:.3f}"]
    tb, ta = report["static_twin_level"]
    lines.append(f"output where nothing blinks (a static twin of the held-out part, over the output "
                 f"on the real part; 0 = invents nothing): before {tb:.3f}, after {ta:.3f}")
    if ta > tb + INVENTION_TOLERANCE:
        rep.warn("the fine-tuned network shows more of this sample where nothing blinks than the "
                 "base did: it has learned the sample's look, not only its blinking; prefer SOFI "
                 "or the base weights where that matters")
    fc = report.get("forgetting_check")
    if fc:
        b, n = fc.get("base", {}), fc.get("new", {})
        lines.append(f"simulated scenes ({fc.get('scenes')}): Pearson thesis-SNR {_f(b.get('thesis_pearson'))}"
                     f" -> {_f(n.get('thesis_pearson'))}, wide domain {_f(b.get('wide_pearson'))} -> "
                     f"{_f(n.get('wide_pearson'))}, output on zero-target scenes "
                     f"{_f(b.get('zero_level'))} -> {_f(n.get('zero_level'))} (0 = invents nothing)")
        if fc.get("worse"):
            rep.warn(f"the fine-tuned weights are worse on simulated scenes ({', '.join(fc['worse'])}): "
                     "they are specialised to this sample; keep the base weights for other samples")
    if report["gain"] <= 0:
        rep.warn("fine-tuning did not raise the held-out agreement: keep the base weights "
                 "(more steps, or a longer recording, may help)")
    written = [str(p) for p in (Path(report["weights"]), files["png"], files["json"]) if p.is_file()]
    lines.append(f"wrote {', '.join(written)}; use it with --weights {report['weights']}")
    for line in lines:
        rep.say(line)
    rep.emit("done", **{k: report[k] for k in ("weights", "model", "before", "after", "gain",
                                                "live_sofi20", "static_twin_level", "steps",
                                                "forgetting_check")},
             png=str(files["png"]))


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


# --------------------------------------------------------------------------- CLI
def run_cli(flags: dict[str, Any]) -> int:
    """`livesr finetune` (realtime/cli_tools.py): flags not given keep FinetuneConfig's defaults."""
    events = bool(flags["events"])
    given = {k: v for k, v in flags.items() if v is not None
             and k not in ("recordings", "no_forgetting_check", "sofi")}
    try:
        cfg = FinetuneConfig(recordings=tuple(flags["recordings"]), sofi=flags["sofi"],
                             forgetting_check=not flags["no_forgetting_check"], **given)
        if cfg.base is not None and not Path(cfg.base).is_file():
            raise RefusedError(f"--from {cfg.base}: no such weights file")
    except ValueError as e:  # RefusedError too
        _error(str(e), events)
        return 2
    try:
        finetune(cfg)
    except (RefusedError, WeightsError) as e:
        _error(str(e), events)
        return 2
    except KeyboardInterrupt:
        _error(f"interrupted; continue with --resume (checkpoint {side_files(cfg.out)['ckpt']})",
               events)
        return 1
    except Exception as e:  # a failure during the run: one line, not a traceback
        _error(f"{type(e).__name__}: {e}", events)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m engines.finetune ARGS` = `livesr finetune ARGS`."""
    from realtime.cli import main as livesr

    return livesr(["finetune", *(sys.argv[1:] if argv is None else argv)])


def _error(message: str, events: bool) -> None:
    if events:
        print(json.dumps({"event": "error", "message": message}), flush=True)
    print(f"livesr finetune: error: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
