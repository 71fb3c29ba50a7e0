"""The ``livesr`` tools beside the live run: train, finetune, evaluate, bench, export, engine, keys.

Each command's signature is its flags; its body imports the module that does the work (torch
only there, so ``livesr --help`` stays fast) and hands it a typed config. The module decides
what is allowed (``TrainConfig``, ``EvaluationConfig``, ``EngineServerConfig``, ...).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Annotated, Any, Callable

import typer

from engines.registry import DEFAULT_ENGINE, DEFAULT_NETWORK, neural_engines

from .cli_flags import sofi_flags, uses
from .config import SofiOptions

__all__ = ["COMMANDS", "TOOL_MODULES", "choice", "tool_module"]

#: command -> the module that does its work (imported when the command runs)
TOOL_MODULES: dict[str, str] = {
    "train": "engines.training",
    "finetune": "engines.finetune",
    "evaluate": "engines.evaluation",
    "evaluate --real": "engines.real_evaluation",
    "bench": "benchmarks.latency",
    "bench --pipeline": "benchmarks.pipeline_bench",
    "export": "engines.onnx_export",
    "engine": "realtime.remote",
    "keys": "realtime.security",
}


class ToolUnavailable(Exception):
    """The module behind a command cannot be imported in this install."""


def tool_module(command: str) -> ModuleType:
    """The module behind ``command``; ToolUnavailable (one line) when it cannot be imported."""
    name = TOOL_MODULES[command]
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name and name.startswith(e.name):
            why = f"{name} is missing"
        else:
            why = f"importing {name} failed: {type(e).__name__}: {e}"
        raise ToolUnavailable(f"livesr {command}: not available in this install ({why})") from None


def choice(flag: str, options: tuple[str, ...]) -> Callable[[str], str]:
    """A parser that accepts one of ``options`` (for flags no config type checks)."""

    def parse(text: str) -> str:
        if text not in options:
            raise typer.BadParameter(f"invalid choice: {text!r} (choose from {', '.join(options)})")
        return text

    parse.__name__ = flag
    return parse


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


# ----------------------------------------------------------------------------- train

_PRESETS = ("cpu", "gpu", "small", "full")  # (small/full: old names of cpu/gpu, engines.training)


def train(
    model: Annotated[str, typer.Option(parser=choice("--model", neural_engines()),
                                       help=" | ".join(neural_engines()))] = DEFAULT_NETWORK,
    preset: Annotated[str, typer.Option(
        "--config", parser=choice("--config", _PRESETS),
        help="cpu: a shared 2-core CPU (1 thread + 1 data process); gpu: one GPU, 14 data "
             "processes (small/full: old names of cpu/gpu)")] = "cpu",
    steps: Annotated[int | None, typer.Option(help="training steps (default: the preset's)")] = None,
    batch: Annotated[int | None, typer.Option(help="samples per step")] = None,
    lr: Annotated[float | None, typer.Option(help="initial learning rate")] = None,
    lr_final: Annotated[float | None, typer.Option(help="final learning rate (cosine decay)")] = None,
    patch: Annotated[int | None, typer.Option(help="training patch size in input pixels")] = None,
    frames: Annotated[int | None, typer.Option(
        help="frames per sample (ConvGRU window / LSTM sequence)")] = None,
    hidden: Annotated[int | None, typer.Option(help="hidden channels (default: architecture's)")] = None,
    mse_weight: Annotated[float | None, typer.Option()] = None,
    l1_weight: Annotated[float | None, typer.Option()] = None,
    image_floor: Annotated[float | None, typer.Option(
        help="per-image relative loss floor (0: plain MSE on sqrt(target)/scale)")] = None,
    pearson_weight: Annotated[float | None, typer.Option()] = None,
    out: Annotated[str | None, typer.Option(
        help="run folder: log.jsonl, ckpt.pt, <model>.pt (default: <user data dir>/livesr/runs/"
             "<model>-<time>)")] = None,
    weights_out: Annotated[str | None, typer.Option(
        help="final weights file (default <out>/<model>.pt)")] = None,
    overwrite_shipped: Annotated[bool, typer.Option(
        "--overwrite-shipped",
        help="allow --out/--weights-out inside the package's weights folder (to ship new default "
             "weights)")] = False,
    resume: Annotated[str | None, typer.Option(help="checkpoint to resume from")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(parser=choice("--device", ("cpu", "cuda")),
                                               help="cpu | cuda")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    workers: Annotated[int | None, typer.Option(help="background data processes (0: inline)")] = None,
    ckpt_every: Annotated[int | None, typer.Option(help="steps between checkpoints")] = None,
    eval_every: Annotated[int | None, typer.Option(help="steps between held-out evaluations")] = None,
    max_minutes: Annotated[float | None, typer.Option(
        help="wall-clock budget; the LR anneals to it and training stops there")] = None,
) -> int:
    """Train a neural engine on simulated data (engines.training)."""
    flags = dict(locals())
    return int(tool_module("train").run_cli(tool_module("train").config_from_flags(flags)))


# ----------------------------------------------------------------------------- keys


def keys(
    out: Annotated[str, typer.Option(help="directory for NAME.key and NAME.key_secret",
                                     show_default=False)],
    name: Annotated[str, typer.Option(help="base name of the key files, e.g. server",
                                      show_default=False)],
) -> int:
    """Make a CURVE key pair for a remote engine link. Run once on the GPU machine (--name server) and once per microscope PC (--name <pc>). Copy each client's public NAME.key into the engine's --allow directory, and the server's public server.key to each client. Never copy a .key_secret file."""  # noqa: E501
    security = tool_module("keys")
    try:
        pub, sec = security.create_keypair(out, name)
    except security.SecurityError as e:
        print(f"livesr keys: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"livesr keys: error: cannot write keys to {out}: {e}", file=sys.stderr)
        return 2
    print(f"public key (share):   {pub}")
    print(f"secret key (private): {sec}")
    return 0


# ----------------------------------------------------------------------------- export


def export(
    engine: Annotated[str, typer.Option(help="neural engine to export")] = DEFAULT_NETWORK,
    size: Annotated[int, typer.Option(help="frame height = width in pixels")] = 128,
    out: Annotated[str, typer.Option(help="output .onnx path")] = "model.onnx",
    weights: Annotated[str | None, typer.Option(help="weights file (default: the engine's)")] = None,
    window: Annotated[int | None, typer.Option(help="frames per output (engine default)")] = None,
    no_check: Annotated[bool, typer.Option("--no-check", help="skip the onnxruntime comparison")] = False,
) -> int:
    """Export a neural engine to ONNX (checked against eager with onnxruntime)."""
    return int(tool_module("export").export_cli(engine=engine, size=size, out=out, weights=weights,
                                                window=window, check=not no_check))


# ----------------------------------------------------------------------------- engine


@uses(sofi=sofi_flags)
def engine(
    *,
    bind: Annotated[str, typer.Option(help="frames endpoint")] = "tcp://127.0.0.1:5570",
    results_bind: Annotated[str | None, typer.Option(help="results endpoint (default: next port)")] = None,
    engine: Annotated[str, typer.Option(help="engine name")] = DEFAULT_ENGINE,
    window: Annotated[int | None, typer.Option(help="frames per output")] = None,
    stride: Annotated[int, typer.Option(help="one output every N frames")] = 1,
    backend: Annotated[str, typer.Option()] = "eager",
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available)")] = None,
    precision: Annotated[str, typer.Option()] = "fp32",
    weights: Annotated[str | None, typer.Option()] = None,
    keys: Annotated[Path | None, typer.Option(
        help="server .key_secret file, or a directory holding one")] = None,
    allow: Annotated[Path | None, typer.Option(help="directory of allowed client public .key files")] = None,
    max_restarts: Annotated[int, typer.Option(help="within a minute, before giving up")] = 5,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="log at DEBUG level")] = False,
    sofi: SofiOptions,
) -> int:
    """Run a reconstruction engine for remote microscopes. Frames arrive on --bind, results leave on the next port. Binding beyond loopback requires CURVE keys (--keys, --allow): make them with `livesr keys`."""  # noqa: E501
    remote = tool_module("engine")
    cfg = remote.EngineServerConfig(
        bind=bind, results_bind=results_bind, engine=engine, window=window, stride=stride,
        backend=backend, device=device, precision=precision, weights=weights, keys=keys,
        allow=allow, max_restarts=max_restarts, sofi=sofi)
    return int(remote.serve_cli(cfg, verbose=verbose))


# ----------------------------------------------------------------------------- evaluate


def evaluate(
    real: Annotated[bool, typer.Option(
        "--real", help="score real movies instead: `livesr evaluate --real [MOVIE ...]` (see "
                       "`livesr evaluate --real --help`)")] = False,
    size: Annotated[int | None, typer.Option(
        help="scene size in camera pixels (default: EvaluationConfig's)")] = None,
    frames: Annotated[int | None, typer.Option(
        help="frames for the neural engines (default: EvaluationConfig's)")] = None,
    n: Annotated[int | None, typer.Option(
        help="scenes per class of the thesis set (default: EvaluationConfig's)")] = None,
    n_wide: Annotated[int | None, typer.Option(help="scenes of the wide set (default: EvaluationConfig's)")] = None,
    n_zero: Annotated[int | None, typer.Option(help="zero-target scenes (default: EvaluationConfig's)")] = None,
    seed: Annotated[int | None, typer.Option(
        help="base seed of the held-out sets (default: EvaluationConfig's)")] = None,
    engines: Annotated[str | None, typer.Option(
        help="comma-separated; sofiN = SOFI on N frames (default: EvaluationConfig's)")] = None,
    sets: Annotated[str | None, typer.Option(help="comma-separated (default: EvaluationConfig's)")] = None,
    classes: Annotated[str | None, typer.Option(
        help="thesis-set classes, comma-separated (default: EvaluationConfig's)")] = None,
    weights: Annotated[list[str] | None, typer.Option(
        metavar="ENGINE=PATH", help="weights file for a neural engine, e.g. convgru=runs/x/convgru.pt "
                                    "(repeatable; default: the shipped weights)")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default: EvaluationConfig's)")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto (default: EvaluationConfig's)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: EvaluationConfig's)")] = None,
    no_figure: Annotated[bool, typer.Option("--no-figure",
                                            help="skip the PNG of example reconstructions")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
) -> int:
    """Score SOFI and the neural engines on held-out simulated sets against the expected cumulant image (Pearson, invented structure, decorrelation resolution, Li TPR/TNR, output level on zero-target scenes, time per output)."""  # noqa: E501
    flags = {k: v for k, v in locals().items() if k != "real"}
    return int(tool_module("evaluate").run_cli(flags))


def evaluate_real(
    movies: Annotated[list[Path] | None, typer.Argument(
        help="more movies (TIFF), besides those in --data", show_default=False)] = None,
    data: Annotated[Path | None, typer.Option(
        help="folder whose TIFFs are scored too (default: the shared data folder; skipped when "
             "absent)")] = None,
    no_data: Annotated[bool, typer.Option("--no-data", help="score only the movies given")] = False,
    engines: Annotated[str | None, typer.Option(
        help="comma-separated rows: meanN, sofiN, convgru, convlstm (default: "
             "RealEvaluationConfig's)")] = None,
    window: Annotated[int | None, typer.Option(help="window of the figure's SOFI")] = None,
    weights: Annotated[list[str] | None, typer.Option(
        metavar="ENGINE=PATH",
        help="weights for a network, e.g. convgru=runs/x/convgru.pt (repeatable)")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default: the current folder)")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    figure_windows: Annotated[int | None, typer.Option(help="windows shown per figure")] = None,
    no_figure: Annotated[bool, typer.Option("--no-figure", help="skip the PNGs")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress lines")] = False,
    na: Annotated[float | None, typer.Option(rich_help_panel="optics (override every movie's)")] = None,
    wavelength_nm: Annotated[float | None, typer.Option(
        rich_help_panel="optics (override every movie's)")] = None,
    psf_fwhm_nm: Annotated[float | None, typer.Option(
        rich_help_panel="optics (override every movie's)")] = None,
    pixel_size_um: Annotated[float | None, typer.Option(
        rich_help_panel="optics (override every movie's)")] = None,
) -> int:
    """Score the engines on real movies against SOFI of all frames: agreement, window-to-window consistency, invented structure and invented filaments, over disjoint windows; writes real_data.{json,csv} and a figure per movie."""  # noqa: E501
    return int(tool_module("evaluate --real").run_cli(dict(locals())))


@uses(sofi=sofi_flags)
def finetune(
    recordings: Annotated[list[str], typer.Argument(
        metavar="RECORDING...", show_default=False,
        help="OME-TIFF / OME-Zarr of a fixed sample, hundreds of frames each (shorter ones are refused)")],
    *,
    out: Annotated[str, typer.Option(metavar="WEIGHTS", show_default=False,
                                     help="the new weights file (.pt)")],
    model: Annotated[str | None, typer.Option(help=" | ".join(neural_engines()) + " (default convgru)")] = None,
    base: Annotated[str | None, typer.Option(
        "--from", metavar="WEIGHTS", help="weights to start from (default: the shipped ones)")] = None,
    steps: Annotated[int | None, typer.Option(help="training steps (default 300)")] = None,
    minutes: Annotated[float | None, typer.Option(
        help="wall-clock budget for training; the learning rate anneals to it")] = None,
    patch: Annotated[int | None, typer.Option(help="patch size in input pixels (default 64)")] = None,
    batch: Annotated[int | None, typer.Option(help="patches per step (default 4)")] = None,
    lr: Annotated[float | None, typer.Option(help="initial learning rate (default 3e-4)")] = None,
    seed: Annotated[int | None, typer.Option(help="(default 0)")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N | auto (default auto)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: half the cores, 1-4)")] = None,
    resume: Annotated[bool, typer.Option("--resume",
                                         help="continue from the checkpoint next to --out")] = False,
    holdout: Annotated[float | None, typer.Option(
        help="share of the field held out for the agreement (default 0.25)")] = None,
    static_share: Annotated[float | None, typer.Option(
        help="share of training samples that are a static twin of the patch (each pixel's mean + "
             "independent noise) with a zero target, so the network does not learn to draw the sample "
             "where nothing blinks (default 0.25)")] = None,
    eval_windows: Annotated[int | None, typer.Option(
        help="held-out windows scored per recording (default 8)")] = None,
    no_forgetting_check: Annotated[bool, typer.Option(
        "--no-forgetting-check", help="skip the check of base and new weights on simulated scenes")] = False,
    events: Annotated[bool, typer.Option(
        "--events", help="print progress as JSON lines on stdout (for the GUI)")] = False,
    sofi: SofiOptions,
) -> int:
    """Fine-tune the ConvGRU or ConvLSTM on recordings of a fixed blinking sample: 20-frame windows in, the SOFI of all frames out; report before/after agreement on a held-out part of the field."""  # noqa: E501
    return int(tool_module("finetune").run_cli(dict(locals())))


def bench(
    pipeline: Annotated[bool, typer.Option(
        "--pipeline", help="end-to-end mode (camera -> ZeroMQ -> engine -> result); see "
                           "`livesr bench --pipeline --help` for its options")] = False,
    engines: Annotated[str | None, typer.Option(help="comma list (default: every engine)")] = None,
    backends: Annotated[str | None, typer.Option(
        help="comma list of eager, channels_last, jit, compile, compile-cudagraphs, onnxruntime, "
             "tensorrt, auto; '+cl' adds channels_last (default eager)")] = None,
    precisions: Annotated[str | None, typer.Option(help="fp32,bf16,fp16,int8 (default fp32)")] = None,
    sizes: Annotated[str | None, typer.Option(help="frame sizes in px (default 128,256,512)")] = None,
    modes: Annotated[str | None, typer.Option(help="window,push (default both)")] = None,
    threads: Annotated[str | None, typer.Option(help="torch threads, comma list (default: torch's)")] = None,
    reps: Annotated[int | None, typer.Option(help="timed repetitions (default 500)")] = None,
    warmup: Annotated[int | None, typer.Option(help="untimed calls first (default 10)")] = None,
    max_seconds: Annotated[float | None, typer.Option(
        help="cap per measurement (fewer reps on slow CPUs; N used is printed)")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N (default cpu)")] = None,
    camera_fps: Annotated[str | None, typer.Option(help="camera rates N for R (default 100,1000)")] = None,
    weights: Annotated[list[str] | None, typer.Option(
        metavar="ENGINE=PATH", help="weights file per engine (repeatable)")] = None,
    no_check: Annotated[bool, typer.Option("--no-check", help="skip the eager-fp32 comparison")] = False,
    interleave: Annotated[bool, typer.Option(
        "--interleave", help="time backends round-robin so a busy shared CPU biases none of them")] = False,
    out_dir: Annotated[str | None, typer.Option(
        help="where CSV/JSON/PNG go (default: the current folder)")] = None,
    stem: Annotated[str | None, typer.Option(help="file name stem (default latency_<device>)")] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="no PNG")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="tiny run: sizes 16,32, 5 reps")] = False,
    list_backends: Annotated[bool, typer.Option("--list-backends",
                                                help="print availability and exit")] = False,
) -> int:
    """Latency benchmark of each engine x backend x precision x size -> ./latency_<device>.{csv,json,png} (benchmarks.latency)."""  # noqa: E501
    return int(tool_module("bench").run_cli({k: v for k, v in locals().items() if k != "pipeline"}))


def bench_pipeline(
    engines: Annotated[str, typer.Option(help="comma list of engines")] = DEFAULT_ENGINE,
    sizes: Annotated[str, typer.Option(help="comma list of frame sizes")] = "128",
    camera_fps: Annotated[str, typer.Option(help="comma list of camera rates")] = "100",
    seconds: Annotated[float, typer.Option(help="acquisition time per run")] = 10.0,
    backends: Annotated[str, typer.Option(help="comma list")] = "eager",
    precisions: Annotated[str, typer.Option(help="comma list")] = "fp32",
    device: Annotated[str, typer.Option()] = "cpu",
    stride: Annotated[int, typer.Option()] = 1,
    threads: Annotated[int | None, typer.Option(help="engine compute threads")] = None,
    worker_mode: Annotated[str, typer.Option(parser=choice("--worker-mode", ("process", "thread")),
                                             help="process | thread")] = "process",
    out_dir: Annotated[str, typer.Option(help="where JSON/CSV go (default: the current folder)")] = ".",
    stem: Annotated[str | None, typer.Option(help="file stem (default pipeline_<device>)")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="tiny run: 16 px, 1 s, thread worker")] = False,
    capacity: Annotated[bool, typer.Option(
        "--capacity", help="also time the engine's push alone and report outputs/s vs that capacity")] = False,
) -> int:
    """End to end, camera -> ZeroMQ -> engine -> result, per engine x size x camera rate (benchmarks.pipeline_bench)."""  # noqa: E501
    return int(tool_module("bench --pipeline").run_cli(SimpleNamespace(**locals())))


#: in the order of `livesr --help`
COMMANDS: list[Callable[..., Any]] = [train, finetune, evaluate, bench, export, engine, keys]
#: commands of their own that a flag of a documented command selects (realtime.cli.main)
#: (named as typed, so that usage and error lines read `livesr bench --pipeline`)
HIDDEN: dict[str, Callable[..., Any]] = {"evaluate --real": evaluate_real, "bench --pipeline": bench_pipeline}
MODE_FLAGS: dict[tuple[str, str], str] = {("evaluate", "--real"): "evaluate --real",
                                          ("bench", "--pipeline"): "bench --pipeline"}
