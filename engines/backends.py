"""Execution backends for the neural engines: eager, channels_last, TorchScript/oneDNN,
torch.compile, ONNX Runtime and TensorRT, plus ``backend="auto"``.

Why this shape. A backend is applied to the *callables an engine actually calls per frame*
("targets", e.g. ``model.encode`` and ``model.fuse_decode`` of the ConvGRU, so the cached
encoder keeps working), not to one monolithic forward. Each target is replaced by an
:class:`AcceleratedModule` that builds the fast path lazily for every input signature it
meets (shape, dtype, device): compilers specialise on shapes anyway, and the first real input
doubles as the check input. Before a fast path is used it is run once next to an eager fp32
reference on that same input; if the relative error exceeds the precision's tolerance the
fast path is refused LOUDLY (``on_mismatch="fallback"``: a RuntimeWarning + log error, then
eager fp32 is used; ``on_mismatch="raise"``: :class:`BackendMismatch`). A fast path may make
the image faster, never silently different.

``backend="auto"`` (after NanoPyx's liquid engine): for each target and signature, every
available backend is built, checked and then timed in interleaved rounds (one call of each per
round, the order rotating, so a busy shared CPU biases none of them); eager is kept unless a
backend is clearly faster (median >= 10 % lower AND its inter-quartile range above eager's,
:func:`pick_backend`). The choice is remembered in ``<cache>/auto_backends.json`` (see
:mod:`engines.backend_cache`) with a short history of measurements, and re-measured after
:data:`AUTO_RECHECK_USES` uses; a change of weights, shape, device or library version misses
the key and measures afresh.

Backend names: ``eager``, ``channels_last`` (= ``eager+cl``), ``jit`` (trace + freeze +
``optimize_for_inference``: oneDNN conv fusion on CPU), ``compile`` (inductor; C++ with frozen,
oneDNN-prepacked weights on CPU, ``max-autotune`` with CUDA graphs on GPU),
``compile-cudagraphs`` (GPU, "reduce-overhead"), ``onnxruntime`` (fp32, needs the ``onnx``
extra), ``tensorrt`` (GPU, torch-tensorrt; int8 via nvidia-modelopt calibration).
``+cl`` after a torch backend adds channels_last memory format.

Engine hook: ``engines.load_engine`` calls :func:`apply_backend(engine, backend, precision)`.
An engine may declare ``backend_targets = ("model.encode", ...)`` (dotted paths to modules or
module methods it calls); ConvGRU/ConvLSTM defaults are in :mod:`engines.registry`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from engines import backend_cache as bc
from engines.registry import BACKEND_PRECISIONS as PRECISIONS
from engines.registry import BACKENDS, ENGINES
from engines.registry import canonical_backend as canonical

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "int8": torch.float32}  # int8: TensorRT quantises internally; IO stays fp32

#: Max |fast - reference| / max |reference| accepted per precision. fp32 only absorbs
#: re-ordered sums / different conv algorithms (~1e-6 per layer, amplified by the recurrence);
#: fp16 (11-bit mantissa) and bf16 (8-bit) compound rounding over ~40 convs of a 20-step GRU.
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 6e-2, "int8": 1e-1}



#: a remembered auto choice is measured again after this many uses (a machine's load and
#: thermal state change; one lucky measurement must not decide for good)
AUTO_RECHECK_USES = 20
#: a backend replaces eager only if its median is at least this much lower ...
AUTO_MARGIN = 0.10


class BackendError(RuntimeError):
    """Base class of backend failures."""


class BackendUnavailable(BackendError):
    """The backend cannot run here; the message starts with 'unavailable: <why>'."""


class BackendMismatch(BackendError):
    """A fast path's output differs from eager fp32 beyond the stated tolerance."""


@dataclass
class CheckReport:
    """Outcome of building + checking one target for one input signature."""

    target: str
    signature: str
    backend: str          # backend asked for (for auto: the winner)
    precision: str
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    tolerance: float = float("nan")
    ok: bool = False
    used: str = ""        # what actually runs: backend name, or "eager-fp32 (fallback: ...)"
    build_s: float = 0.0
    auto_timings_ms: dict[str, float] = field(default_factory=dict)
    auto_errors: dict[str, str] = field(default_factory=dict)
    auto_cached: bool = False


# --------------------------------------------------------------------------- availability


# BACKENDS, BACKEND_ALIASES and canonical() live in engines.registry (torch-free: the CLI and the GUI
# list them without importing torch)


def _split(backend: str) -> tuple[str, bool]:
    """'compile+cl' -> ('compile', True); 'channels_last' -> ('eager', True)."""
    backend = canonical(backend)
    if backend == "channels_last":
        return "eager", True
    base, _, flag = backend.partition("+")
    if flag not in ("", "cl"):
        raise ValueError(f"unknown backend modifier {flag!r} in {backend!r} (only '+cl')")
    return base, flag == "cl"


def import_error(module: str) -> str | None:
    """None when ``module`` imports, else its error in one line (the "unavailable: why")."""
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001 - any import failure means unavailable
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def backend_status(backend: str, device: str | torch.device = "cpu",
                   precision: str = "fp32") -> str:
    """'ok', or 'unavailable: <why>' for this backend x device x precision on this machine."""
    try:
        base, cl = _split(backend)
    except ValueError as e:
        return f"unavailable: {e}"
    if base not in BACKENDS or (cl and base in ("onnxruntime", "tensorrt")):
        return f"unavailable: unknown backend {backend!r}; choose from {BACKENDS} or 'auto'"
    if precision not in PRECISIONS:
        return f"unavailable: unknown precision {precision!r}; choose from {PRECISIONS}"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "unavailable: CUDA device requested but torch sees no GPU"
    if precision == "int8" and base != "tensorrt":
        return f"unavailable: int8 is only implemented through TensorRT, not {base!r}"
    if base == "compile-cudagraphs" and dev.type != "cuda":
        return "unavailable: CUDA graphs need a GPU (use 'compile' on CPU)"
    if base == "compile" and dev.type == "cpu":
        import shutil
        if not (shutil.which("gcc") or shutil.which("g++") or shutil.which("clang")):
            return "unavailable: torch.compile on CPU needs a C++ compiler (gcc/clang) on PATH"
    if base == "onnxruntime":
        why = import_error("onnxruntime")
        if why:
            return f"unavailable: onnxruntime not installed ({why}); pip install 'livesr[onnx]'"
        if precision != "fp32":
            return "unavailable: the onnxruntime backend runs fp32 models only"
        if dev.type == "cuda":
            import onnxruntime as ort
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return "unavailable: onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    if base == "tensorrt":
        if dev.type != "cuda":
            return "unavailable: TensorRT needs an NVIDIA GPU (device='cuda')"
        why = import_error("torch_tensorrt")
        if why:
            return f"unavailable: torch-tensorrt not installed ({why}); pip install 'livesr[tensorrt]'"
        if precision == "int8" and import_error("modelopt.torch.quantization"):
            return "unavailable: int8 calibration needs nvidia-modelopt (pip install nvidia-modelopt)"
    if precision == "bf16" and dev.type == "cpu" and base != "eager":
        if not torch.backends.mkldnn.is_available():
            return "unavailable: bf16 on CPU needs oneDNN (mkldnn) in this torch build"
    if precision == "fp16" and dev.type == "cpu" and base in ("jit", "compile"):
        return f"unavailable: fp16 with {base!r} on CPU has no fast kernels; use bf16"
    return "ok"


def available_backends(device: str | torch.device = "cpu", precision: str = "fp32",
                       include_cl: bool = True) -> list[str]:
    """Backends whose status is 'ok' here, in a stable order (eager first)."""
    names = list(BACKENDS) + (["jit+cl", "compile+cl"] if include_cl else [])
    return [b for b in names if backend_status(b, device, precision) == "ok"]


# --------------------------------------------------------------------------- helpers


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _dtype_of(module: nn.Module) -> torch.dtype:
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _signature(args: Sequence[Any]) -> str:
    leaves, spec = tree_flatten(list(args))
    parts = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            parts.append(("x".join(map(str, x.shape)) or "scalar") + ":" + str(x.dtype).replace("torch.", "")
                         + "@" + x.device.type)
        else:
            parts.append(repr(x))
    return ",".join(parts) + "|" + str(len(leaves))


def _cast(tree: Any, dtype: torch.dtype, channels_last: bool = False) -> Any:
    def f(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.to(dtype)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
        return x
    return tree_map(f, tree)


def _first_float_dtype(tree: Any) -> torch.dtype:
    for x in tree_flatten(tree)[0]:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.dtype
    return torch.float32


def compare(out: Any, ref: Any) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|) over all tensor leaves, in float64."""
    o_leaves, o_spec = tree_flatten(out)
    r_leaves, r_spec = tree_flatten(ref)
    if len(o_leaves) != len(r_leaves):
        raise BackendMismatch(f"fast path returned {len(o_leaves)} tensors, reference {len(r_leaves)}")
    max_abs, scale = 0.0, 0.0
    for o, r in zip(o_leaves, r_leaves, strict=True):
        if not isinstance(r, torch.Tensor):
            continue
        if not isinstance(o, torch.Tensor) or tuple(o.shape) != tuple(r.shape):
            raise BackendMismatch(f"fast path output shape {getattr(o, 'shape', type(o))} "
                                  f"!= reference {tuple(r.shape)}")
        o64, r64 = o.detach().double().cpu(), r.detach().double().cpu()
        if not bool(torch.isfinite(o64).all()):
            return float("inf"), float("inf")
        if r64.numel():
            max_abs = max(max_abs, float((o64 - r64).abs().max()))
            scale = max(scale, float(r64.abs().max()))
    return max_abs, max_abs / max(scale, 1e-12)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MethodModule(nn.Module):
    """Makes a module *method* (e.g. ``ConvGRUNet.fuse_decode``) compilable/exportable."""

    def __init__(self, owner: nn.Module, method: str):
        super().__init__()
        self.owner = owner
        self.method = method
        self._fn = getattr(type(owner), method)

    def forward(self, *args: Any) -> Any:
        return self._fn(self.owner, *args)


class FlatModule(nn.Module):
    """Presents ``module`` as flat-tensors-in, flat-tuple-out (what tracers and exporters take).

    The ConvLSTM step takes and returns ``[(h, c), ...]`` state lists; ``torch.jit.trace`` and
    ONNX only deal in flat tensors, so nesting is undone here and redone by the caller.
    """

    def __init__(self, module: nn.Module, args: tuple):
        super().__init__()
        self.inner = module
        leaves, self.in_spec = tree_flatten(list(args))
        self.tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        self.consts = leaves
        with torch.no_grad():
            self.out_spec = tree_flatten(module(*args))[1]

    def flat_args(self, args: Sequence[Any]) -> tuple:
        leaves = tree_flatten(list(args))[0]
        return tuple(leaves[i] for i in self.tensor_pos)

    def example_args(self, args: Sequence[Any]) -> tuple:
        """Flat example inputs with no two sharing memory: a tracer seeing ``h is c`` (the
        ConvLSTM zero state) would wire both graph inputs to one tensor."""
        return tuple(t.clone() for t in self.flat_args(args))

    def forward(self, *tensors: torch.Tensor) -> tuple:
        leaves = list(self.consts)
        for i, t in zip(self.tensor_pos, tensors, strict=True):
            leaves[i] = t
        return tuple(tree_flatten(self.inner(*tree_unflatten(leaves, self.in_spec)))[0])

    def wrap(self, fast: Callable[..., Any]) -> Callable[..., Any]:
        """Turn a compiled flat callable back into one with the module's nested signature."""
        def run(*args: Any) -> Any:
            out = fast(*self.flat_args(args))
            out = list(out) if isinstance(out, (tuple, list)) else [out]
            return tree_unflatten(out, self.out_spec)
        return run


# --------------------------------------------------------------------------- builders
# Each builder gets the module in the *fast* dtype (already copied if needed) and the example
# args already cast to that dtype, and returns a callable taking args of that dtype.

Builder = Callable[..., Callable[..., Any]]


def _build_eager(module: nn.Module, args: tuple, ctx: dict) -> Callable[..., Any]:
    return module


def _build_jit(module: nn.Module, args: tuple, ctx: dict) -> Callable[..., Any]:
    flat = FlatModule(module, args).eval()
    fargs = flat.example_args(args)
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13 marks TorchScript deprecated; it is still the route to oneDNN fusion
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(flat, fargs, check_trace=False, strict=False)
        frozen = torch.jit.freeze(traced.eval())
        fast = torch.jit.optimize_for_inference(frozen)
        for _ in range(3):  # the profiling executor specialises over the first runs
            fast(*fargs)
    return flat.wrap(fast)


def _build_compile(module: nn.Module, args: tuple, ctx: dict) -> Callable[..., Any]:
    import os
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(bc.cache_dir() / "inductor"))
    cfg = torch._dynamo.config  # noqa: SLF001 - torch has no public form of dynamo's config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    dev = ctx["device"]
    mode = ctx.get("compile_mode")
    if mode is None:
        mode = "reduce-overhead" if ctx["base"] == "compile-cudagraphs" else (
            "max-autotune" if dev.type == "cuda" else None)
    # CPU inference: let inductor freeze the weights into the graph, which pre-packs them for
    # oneDNN and fuses the pointwise gate ops into the convolutions (weights never change
    # while an engine runs; apply_backend again after loading new weights)
    freezing = ctx.get("compile_freezing")
    if freezing is None:
        freezing = dev.type == "cpu"
    compiled = torch.compile(module, mode=mode, dynamic=False, fullgraph=False)

    def call(*a: Any) -> Any:
        with torch._inductor.config.patch(freezing=bool(freezing)):  # noqa: SLF001 - no public form
            return compiled(*a)

    with torch.no_grad():
        for _ in range(3 if dev.type == "cuda" else 1):  # CUDA graphs record on the 2nd/3rd call
            call(*args)
    if dev.type == "cuda" and mode in ("reduce-overhead", "max-autotune"):
        # a CUDA-graph replay overwrites its static outputs: hand out copies
        return lambda *a: tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x,
                                   call(*a))
    return call


def export_onnx_file(module: nn.Module, args: tuple, path: Any) -> None:
    """torch.onnx.export with the torch.export-based exporter (needs onnxscript), else legacy."""
    module = module.float().eval()
    args32 = _cast(args, torch.float32)
    sink = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if import_error("onnxscript") is None:
            try:
                prog = torch.onnx.export(module, tuple(args32), dynamo=True, optimize=True,
                                         verbose=False)
                if prog is None:
                    raise BackendError("the dynamo exporter returned no ONNX program")
                prog.save(str(path), external_data=False)
                return
            except Exception as e:  # noqa: BLE001 - fall back to the TorchScript exporter
                log.warning("dynamo ONNX export failed (%s); trying the legacy exporter", e)
        torch.onnx.export(module, tuple(args32), str(path), dynamo=False, opset_version=17)


def _build_onnxruntime(module: nn.Module, args: tuple, ctx: dict) -> Callable[..., Any]:
    import numpy as np
    import onnxruntime as ort

    dev = ctx["device"]
    key = bc.artefact_key(module_hash=bc.module_fingerprint(module), signature=_signature(args),
                          backend="onnxruntime", precision="fp32", device=dev)
    path = bc.artefact_path(key, ".onnx")
    ctx["artefact"] = str(path)
    flat = FlatModule(module, args)
    if not path.exists():
        tmp = path.with_name(path.name + ".partial.onnx")
        cpu_args = tree_map(lambda x: x.cpu() if isinstance(x, torch.Tensor) else x, args)
        flat_cpu = FlatModule(copy.deepcopy(module).cpu().float(), _cast(cpu_args, torch.float32))
        export_onnx_file(flat_cpu, flat_cpu.example_args(_cast(cpu_args, torch.float32)), tmp)
        tmp.replace(path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if dev.type == "cuda"
                 else ["CPUExecutionProvider"])
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    names = [i.name for i in sess.get_inputs()]
    n_in = len(flat.tensor_pos)
    if len(names) != n_in:
        raise BackendError(f"ONNX graph takes {len(names)} inputs but the call passes "
                           f"{n_in} tensors (an unused input was dropped by the exporter?)")

    def run(*tensors: torch.Tensor) -> list:
        feed = {n: x.detach().float().cpu().numpy() for n, x in zip(names, tensors, strict=True)}
        return [torch.from_numpy(np.asarray(o)).to(dev) for o in sess.run(None, feed)]

    return flat.wrap(run)


def _build_tensorrt(module: nn.Module, args: tuple, ctx: dict) -> Callable[..., Any]:
    """torch-tensorrt (dynamo IR), engine cached on disk as an ExportedProgram."""
    import torch_tensorrt  # guarded by backend_status

    precision = ctx["precision"]
    dev = ctx["device"]
    flat = FlatModule(module, args).eval()
    fargs = list(flat.example_args(args))
    key = bc.artefact_key(module_hash=bc.module_fingerprint(module), signature=_signature(args),
                          backend="tensorrt", precision=precision, device=dev)
    path = bc.artefact_path(key, ".trt.ep")
    ctx["artefact"] = str(path)
    if path.exists():
        try:
            return flat.wrap(torch.export.load(str(path)).module())
        except Exception as e:  # noqa: BLE001 - stale/corrupt artefact: rebuild it
            log.warning("cached TensorRT engine %s unusable (%s); rebuilding", path, e)
    enabled = {"fp32": {torch.float32}, "fp16": {torch.float16},
               "bf16": {torch.bfloat16}}.get(precision, {torch.float32})
    if precision == "int8":
        # post-training quantisation: ModelOpt inserts Q/DQ nodes calibrated on real calls of
        # this target (ctx["calibration"]: inputs recorded while simulated frames ran through
        # the engine, see calibration_inputs), TensorRT turns them into int8 layers
        import modelopt.torch.quantization as mtq
        from modelopt.torch.quantization.utils import export_torch_mode

        calib = ctx.get("calibration") or [tuple(fargs)]
        model_q = copy.deepcopy(flat)

        def loop(m: nn.Module) -> None:
            for sample in calib:
                m(*sample)

        mtq.quantize(model_q, mtq.INT8_DEFAULT_CFG, forward_loop=loop)
        with torch.no_grad(), export_torch_mode():
            ep = torch.export.export(model_q, tuple(fargs), strict=False)
            trt = torch_tensorrt.dynamo.compile(ep, arg_inputs=fargs,
                                                enabled_precisions={torch.int8, torch.float16},
                                                min_block_size=1)
    else:
        trt = torch_tensorrt.compile(flat, ir="dynamo", arg_inputs=fargs,
                                     enabled_precisions=enabled, min_block_size=1)
    try:
        try:
            torch_tensorrt.save(trt, str(path), arg_inputs=fargs)
        except TypeError:  # torch-tensorrt < 2.5 names it `inputs`
            torch_tensorrt.save(trt, str(path), inputs=fargs)
    except Exception as e:  # noqa: BLE001 - caching is an optimisation, the engine still runs
        log.warning("could not cache the TensorRT engine at %s: %s", path, e)
    return flat.wrap(trt)


_BUILDERS: dict[str, Builder] = {
    "eager": _build_eager, "jit": _build_jit, "compile": _build_compile,
    "compile-cudagraphs": _build_compile, "onnxruntime": _build_onnxruntime,
    "tensorrt": _build_tensorrt,
}


# --------------------------------------------------------------------------- the wrapper


def time_interleaved(fns: dict[str, Callable[..., Any]], args: tuple, device: torch.device, *,
                     rounds: int = 15, min_rounds: int = 5, budget_s: float = 10.0
                     ) -> dict[str, list[float]]:
    """ms per call of each fn, measured in rounds: one call of each per round, the order
    rotated every round, so a load change on a shared machine hits all of them alike.

    Stops after ``rounds`` rounds, or once ``budget_s`` is spent and ``min_rounds`` are done.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for n in names:  # one untimed call each: lazy initialisation, caches
            fns[n](*args)
        _sync(device)
        t_end = time.perf_counter() + budget_s
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                fns[n](*args)
                _sync(device)
                samples[n].append((time.perf_counter() - t0) * 1e3)
            if r + 1 >= min_rounds and time.perf_counter() > t_end:
                break
    return samples


def _quartiles(v: Sequence[float]) -> tuple[float, float, float]:
    if len(v) < 2:
        x = float(v[0]) if v else float("nan")
        return x, x, x
    q1, q2, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return q1, q2, q3


def pick_backend(samples: Mapping[str, Sequence[float]], baseline: str = "eager",
                 margin: float = AUTO_MARGIN) -> str:
    """The backend to use from interleaved timings (ms): ``baseline`` unless another is
    clearly faster - median at least ``margin`` lower and its 75th percentile below the
    baseline's 25th (the spreads do not overlap). Without the baseline: the lowest median."""
    med = {k: _quartiles(v)[1] for k, v in samples.items() if v}
    if not med:
        raise ValueError("no timings to choose from")
    best = min(med, key=med.__getitem__)
    if baseline not in med or best == baseline:
        return best
    base_q1, base_med, _ = _quartiles(samples[baseline])
    _, best_med, best_q3 = _quartiles(samples[best])
    if best_med <= (1.0 - margin) * base_med and best_q3 < base_q1:
        return best
    return baseline


class AcceleratedModule(nn.Module):
    """A target run through a backend, specialised per input signature, checked vs eager fp32.

    ``reports`` holds one :class:`CheckReport` per signature seen; ``calls`` counts calls so a
    benchmark can prove the fast path was actually exercised.
    """

    def __init__(self, module: nn.Module, backend: str, precision: str = "fp32", *,
                 target: str = "", engine: str = "", check: bool = True,
                 tolerance: float | None = None, on_mismatch: str = "fallback",
                 candidates: Sequence[str] | None = None, compile_mode: str | None = None,
                 compile_freezing: bool | None = None,
                 auto_reps: int = 15, auto_budget_s: float = 10.0,
                 calibration: list[tuple] | None = None, remember: bool = True,
                 check_calls: int = 3,
                 calibrator: Callable[[tuple], list[tuple]] | None = None):
        super().__init__()
        if backend != "auto":
            status = backend_status(backend, _device_of(module), precision)
            if status != "ok":
                raise BackendUnavailable(status)
        if on_mismatch not in ("fallback", "raise"):
            raise ValueError("on_mismatch must be 'fallback' or 'raise'")
        self.inner = module
        self.backend = backend
        self.precision = precision
        self.target = target or type(module).__name__
        self.engine = engine
        self.check = check
        self.tolerance = TOLERANCE[precision] if tolerance is None else float(tolerance)
        self.on_mismatch = on_mismatch
        self.candidates = list(candidates) if candidates else None
        self.compile_mode = compile_mode
        self.compile_freezing = compile_freezing
        self.auto_reps, self.auto_budget_s = auto_reps, auto_budget_s
        self.calibration = calibration
        self.remember = remember
        self.check_calls = int(check_calls)
        self.calibrator = calibrator
        self._checked: dict[str, int] = {}
        self.calls = 0
        self.reports: dict[str, CheckReport] = {}
        self._paths: dict[str, Callable[..., Any]] = {}
        self._reference: nn.Module | None = None

    # -- modules in the right dtype
    def _reference_module(self) -> nn.Module:
        """Eager fp32 copy (the inner module itself if it already is fp32)."""
        if self._reference is None:
            self._reference = (self.inner if _dtype_of(self.inner) == torch.float32
                               else copy.deepcopy(self.inner).float())
        return self._reference

    def _fast_module(self, base: str, cl: bool) -> nn.Module:
        want = DTYPES[self.precision]
        m = self.inner
        if _dtype_of(m) != want or cl:
            m = copy.deepcopy(m).to(want)
            if cl:
                # works at runtime; torch's stubs lack Module.to(memory_format=...)
                m = m.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return m.eval()

    # -- build one backend for one signature, checked
    def _build_one(self, backend: str, args: tuple, sig: str) -> tuple[Callable[..., Any], CheckReport]:
        base, cl = _split(backend)
        dev = _device_of(self.inner)
        status = backend_status(backend, dev, self.precision)
        if status != "ok":
            raise BackendUnavailable(status)
        want = DTYPES[self.precision]
        in_dtype = _first_float_dtype(args)
        fast_args = tuple(_cast(args, want, cl))
        calibration = self.calibration
        if calibration is None and self.precision == "int8" and self.calibrator is not None:
            calibration = [tuple(_cast(c, want, cl)) for c in self.calibrator(args)]
        ctx = {"device": dev, "base": base, "precision": self.precision,
               "compile_mode": self.compile_mode, "compile_freezing": self.compile_freezing,
               "calibration": calibration}
        t0 = time.perf_counter()
        with torch.no_grad():
            raw = _BUILDERS[base](self._fast_module(base, cl), fast_args, ctx)

        if base == "eager" and not cl and want == in_dtype:
            fn = raw  # nothing to convert: no per-call cost over the plain module
        else:
            def fn(*a: Any) -> Any:
                return _cast(raw(*_cast(a, want, cl)), in_dtype)

        report = CheckReport(target=self.target, signature=sig, backend=backend,
                             precision=self.precision, tolerance=self.tolerance, used=backend)
        if self.check:
            with torch.no_grad():
                ref = self._reference_module()(*_cast(args, torch.float32))
                fn(*args)
                out = fn(*args)  # steady-state output (CUDA graphs / JIT profiling settled)
            report.max_abs, report.max_rel = compare(out, ref)
            report.ok = report.max_rel <= self.tolerance
        else:
            report.ok = True
        report.build_s = time.perf_counter() - t0
        if not report.ok:
            raise BackendMismatch(
                f"{self.engine}:{self.target} backend {backend!r} {self.precision} deviates from "
                f"eager fp32 by max rel {report.max_rel:.3g} (max abs {report.max_abs:.3g}) > "
                f"tolerance {self.tolerance:g} on input {sig}")
        return fn, report

    def _fallback(self, sig: str, why: str, report: CheckReport | None) -> Callable[..., Any]:
        msg = (f"livesr backend {self.backend!r} REFUSED for {self.engine}:{self.target} on {sig}: "
               f"{why} -> running eager fp32 instead (image unchanged, speed not)")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        log.error(msg)
        report = report or CheckReport(target=self.target, signature=sig, backend=self.backend,
                                       precision=self.precision, tolerance=self.tolerance)
        report.used = f"eager-fp32 (fallback: {why})"
        self.reports[sig] = report
        ref = self._reference_module()
        in_dtype_cache: dict[str, torch.dtype] = {}

        def fn(*a: Any) -> Any:
            d = in_dtype_cache.setdefault("d", _first_float_dtype(a))
            return _cast(ref(*_cast(a, torch.float32)), d)

        return fn

    def _choose_auto(self, args: tuple, sig: str) -> tuple[Callable[..., Any], CheckReport]:
        dev = _device_of(self.inner)
        key = bc.auto_choice_key(engine=self.engine, target=self.target, signature=sig,
                                 device=dev, precision=self.precision,
                                 module_hash=bc.module_fingerprint(self.inner))
        remembered = bc.get_auto_choice(key) if self.remember else None
        if remembered is not None and int(remembered.get("uses", 0)) < AUTO_RECHECK_USES:
            try:
                fn, report = self._build_one(remembered["backend"], args, sig)
                report.auto_timings_ms = dict(remembered.get("timings_ms", {}))
                report.auto_cached = True
                bc.count_auto_use(key)
                return fn, report
            except BackendError as e:
                log.warning("remembered auto backend %s failed now (%s); re-measuring",
                            remembered["backend"], e)
        elif remembered is not None:
            log.info("auto: re-measuring %s:%s after %d uses of %s", self.engine, self.target,
                     remembered.get("uses", 0), remembered["backend"])
        cands = self.candidates or available_backends(dev, self.precision)
        errors: dict[str, str] = {}
        built: dict[str, tuple[Callable[..., Any], CheckReport]] = {}
        for name in cands:
            try:
                built[name] = self._build_one(name, args, sig)
            except Exception as e:  # noqa: BLE001 - a candidate failing is data, not a crash
                errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if not built:
            raise BackendError(f"auto: no backend passed for {self.target} on {sig}: {errors}")
        samples = time_interleaved({k: v[0] for k, v in built.items()}, args, dev,
                                   rounds=self.auto_reps, budget_s=self.auto_budget_s)
        best = pick_backend(samples, baseline=cands[0] if "eager" not in built else "eager")
        timings = {k: statistics.median(v) for k, v in samples.items()}
        fn, report = built[best]
        report.auto_timings_ms, report.auto_errors = timings, errors
        if self.remember:
            bc.store_auto_choice(key, {
                "backend": best, "timings_ms": timings, "errors": errors,
                "iqr_ms": {k: [_quartiles(v)[0], _quartiles(v)[2]] for k, v in samples.items()},
                "rounds": len(next(iter(samples.values()))), "uses": 0,
                "max_rel": report.max_rel, "engine": self.engine, "target": self.target,
                "signature": sig, "precision": self.precision, "device": bc.device_name(dev),
                "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
        return fn, report

    def _prepare(self, args: tuple, sig: str) -> Callable[..., Any]:
        report = None
        try:
            if self.backend == "auto":
                fn, report = self._choose_auto(args, sig)
            else:
                fn, report = self._build_one(self.backend, args, sig)
        except BackendMismatch as e:
            if self.on_mismatch == "raise":
                raise
            return self._fallback(sig, str(e), report)
        except Exception as e:  # noqa: BLE001 - build failure: same policy as a mismatch
            if self.on_mismatch == "raise":
                if isinstance(e, BackendError):
                    raise
                raise BackendError(f"{self.backend} failed to build for {self.target}: {e}") from e
            return self._fallback(sig, f"build failed: {type(e).__name__}: {e}".splitlines()[0], None)
        self.reports[sig] = report
        return fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError(f"{self.target}: backends take positional arguments only")
        self.calls += 1
        sig = _signature(args)
        fn = self._paths.get(sig)
        if fn is None:
            fn = self._paths[sig] = self._prepare(tuple(args), sig)
            self._checked[sig] = 1  # the build check ran on exactly these inputs
        elif self.check and self._checked.get(sig, self.check_calls) < self.check_calls:
            return self._checked_call(fn, args, sig)
        return fn(*args)

    def recheck(self) -> None:
        """Compare the next ``check_calls`` calls of every built path with eager fp32 again
        (after a warm-up on simulated frames, the first real frames are checked too)."""
        for sig in self._checked:
            self._checked[sig] = 0

    def _checked_call(self, fn: Callable[..., Any], args: tuple, sig: str) -> Any:
        """Compare a later call with eager fp32 too: the first input of a recurrent step (the
        zero state) can hide a wrong graph that only later states expose."""
        self._checked[sig] += 1
        report = self.reports.get(sig)
        with torch.no_grad():
            out = fn(*args)
            ref = self._reference_module()(*_cast(args, torch.float32))
        max_abs, max_rel = compare(out, ref)
        if report is not None:
            report.max_abs = max(report.max_abs, max_abs)
            report.max_rel = max(report.max_rel, max_rel)
        if max_rel <= self.tolerance:
            return out
        msg = (f"{self.engine}:{self.target} backend {report.used if report else self.backend!r} "
               f"deviates from eager fp32 on call {self._checked[sig]} by max rel {max_rel:.3g} "
               f"(max abs {max_abs:.3g}) > tolerance {self.tolerance:g} on input {sig}")
        if self.on_mismatch == "raise":
            raise BackendMismatch(msg)
        self._paths[sig] = self._fallback(sig, msg, report)
        self._checked[sig] = self.check_calls
        return _cast(ref, _first_float_dtype(args))


# --------------------------------------------------------------------------- engine hook


def _resolve(root: Any, path: str) -> tuple[Any, str, Any]:
    parts = path.split(".")
    parent = root
    for p in parts[:-1]:
        parent = getattr(parent, p)
    return parent, parts[-1], getattr(parent, parts[-1])


def _is_child(parent: Any, attr: str) -> bool:
    """Whether ``attr`` is a registered submodule of ``parent`` (not an instance attribute or
    a method): that decides between ``add_module`` and shadowing the attribute."""
    # no public form: named_children() drops a module registered under two names
    return isinstance(parent, nn.Module) and attr in parent._modules  # noqa: SLF001 - see above


def engine_targets(engine: Any) -> tuple[str, ...]:
    """Dotted paths of what the engine calls per frame (declared, known, or its modules)."""
    declared = getattr(engine, "backend_targets", None)
    if declared:
        return tuple(declared)
    info = ENGINES.get(str(getattr(engine, "name", "")))
    if info is not None and info.backend_targets:
        return info.backend_targets
    return tuple(k for k, v in vars(engine).items() if isinstance(v, nn.Module))


def apply_backend(engine: Any, backend: str = "eager", precision: str = "fp32",
                  **options: Any) -> Any:
    """Route the engine's per-frame torch calls through ``backend``; returns the engine.

    "eager" leaves the engine untouched (it already runs in ``precision``). Engines without
    torch modules (SOFI) accept only "eager"/"auto". ``options`` go to
    :class:`AcceleratedModule` (check, tolerance, on_mismatch, candidates, compile_mode, ...).
    Records ``engine.backend`` and ``engine.backend_modules`` (target -> AcceleratedModule).
    """
    backend = canonical(backend)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    remove_backend(engine)  # applying a backend again replaces the previous one
    if backend == "eager" and precision == "fp32":
        engine.backend = "eager"
        return engine
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    if backend != "auto":
        base, cl = _split(backend)  # validates the modifier
        if base not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: choose one of "
                             f"{', '.join(BACKENDS)}, jit+cl, compile+cl or auto")
    targets = engine_targets(engine)
    resolved = []
    for path in targets:
        try:
            parent, attr, obj = _resolve(engine, path)
        except AttributeError:
            continue
        if isinstance(obj, nn.Module):
            module = obj
        elif callable(obj) and isinstance(getattr(obj, "__self__", None), nn.Module):
            module = MethodModule(obj.__self__, attr)
        else:
            continue
        resolved.append((path, parent, attr, module))
    if not resolved:
        if backend in ("auto", "eager"):
            engine.backend = "eager"
            return engine
        raise BackendUnavailable(
            f"unavailable: engine {getattr(engine, 'name', type(engine).__name__)!r} has no torch "
            f"modules to run through {backend!r}; only 'eager' applies")
    name = getattr(engine, "name", type(engine).__name__)
    eager_twin = copy.deepcopy(engine) if precision == "int8" else None
    wrappers: dict[str, AcceleratedModule] = {}
    for path, _parent, _attr, module in resolved:
        opts = dict(options)
        if eager_twin is not None and "calibration" not in opts:
            opts.setdefault("calibrator", make_calibrator(eager_twin, path))
        wrappers[path] = AcceleratedModule(module, backend, precision, target=path, engine=name,
                                           **opts)
    for path, parent, attr, _module in resolved:
        if _is_child(parent, attr):
            parent.add_module(attr, wrappers[path])
        else:
            object.__setattr__(parent, attr, wrappers[path])  # shadows the bound method
    engine.backend = backend
    engine.backend_modules = wrappers
    return engine


def remove_backend(engine: Any) -> Any:
    """Put the engine's original modules / methods back (undo :func:`apply_backend`)."""
    mods: dict[str, AcceleratedModule] = getattr(engine, "backend_modules", None) or {}
    for path, wrapper in mods.items():
        parent, attr, obj = _resolve(engine, path)
        if obj is not wrapper:
            continue
        if _is_child(parent, attr):
            parent.add_module(attr, wrapper.inner)
        else:
            object.__delattr__(parent, attr)  # the class method shows through again
    engine.backend_modules = {}
    engine.backend = "eager"
    return engine


def warm_up(engine: Any, shape: tuple[int, int], seed: int = 0) -> float:
    """Build, check (and for auto: time) every accelerated per-frame path of ``engine`` for
    ``shape`` frames now, on simulated blinking frames; then reset the engine. Returns seconds.

    Called by the live worker before the camera starts, so that compiling never happens while
    frames queue up. Checks against eager fp32 are re-armed for the first real frames.
    """
    mods: dict[str, AcceleratedModule] = getattr(engine, "backend_modules", {}) or {}
    if not mods:
        return 0.0
    t0 = time.perf_counter()
    h, w = (int(v) for v in shape)
    many = getattr(engine, "push_many", None)
    batch = int(getattr(engine, "encode_batch", 1)) if callable(many) else 1
    frames = simulated_stack(max(h, w), engine.window + batch * (batch + 1) // 2 + 3,
                             seed=seed)[:, :h, :w]
    engine.reset()
    n = engine.window + 3
    for f in frames[:n]:
        engine.push(f)
    if callable(many):
        for k in range(2, batch + 1):  # every encoder batch size push_many will use
            many(list(frames[n:n + k]))
            n += k
    engine.reset()
    for m in mods.values():
        m.recheck()
    return time.perf_counter() - t0


def backend_reports(engine: Any) -> list[dict[str, Any]]:
    """All check reports of an engine's accelerated targets (empty for eager)."""
    mods: dict[str, AcceleratedModule] = getattr(engine, "backend_modules", {}) or {}
    return [asdict(r) for m in mods.values() for r in m.reports.values()]


def backend_calls(engine: Any) -> dict[str, int]:
    """How often each accelerated target was called (0 means the backend did nothing)."""
    mods: dict[str, AcceleratedModule] = getattr(engine, "backend_modules", {}) or {}
    return {k: m.calls for k, m in mods.items()}


def describe_backends(device: str | torch.device = "cpu",
                      precisions: Iterable[str] = ("fp32", "bf16", "fp16", "int8")) -> str:
    """Human-readable availability table (for `livesr bench --list-backends`)."""
    names = list(BACKENDS) + ["jit+cl", "compile+cl"]
    lines = []
    for p in precisions:
        for b in names:
            lines.append(f"{b:20s} {p:5s} {backend_status(b, device, p)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- calibration / export


def simulated_stack(size: int, frames: int, seed: int = 0) -> "Any":
    """(frames, size, size) uint16 blinking frames from the project simulator (numpy only),
    so checks, int8 calibration and exports see realistic data, not white noise."""
    import numpy as np

    try:
        from acquisition.simulation import BlinkingScene, SimulationConfig

        return BlinkingScene(SimulationConfig(size=size, seed=seed)).frames(frames)
    except ImportError:  # simulator absent in a trimmed install: Poisson noise on an offset
        rng = np.random.default_rng(seed)
        return (100 + rng.poisson(20.0, (frames, size, size))).astype(np.uint16)


def record_target_inputs(engine: Any, path: str, frames: Any) -> list[tuple]:
    """Push ``frames`` through an (eager) engine and return the arguments of every call of
    target ``path`` (cloned): realistic inputs for an inner module such as ``fuse_decode``."""
    parent, attr, original = _resolve(engine, path)
    seen: list[tuple] = []
    in_modules = _is_child(parent, attr)
    had_instance_attr = attr in vars(parent)

    def recorder(*args: Any) -> Any:
        seen.append(tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x,
                             tuple(args)))
        return original(*args)

    if in_modules:
        class _Rec(nn.Module):
            def forward(self, *a: Any) -> Any:
                return recorder(*a)
        parent.add_module(attr, _Rec())
    else:
        object.__setattr__(parent, attr, recorder)
    try:
        engine.reset()
        for f in frames:
            engine.push(f)
    finally:
        if in_modules:
            parent.add_module(attr, original)
        elif had_instance_attr:
            object.__setattr__(parent, attr, original)
        else:
            object.__delattr__(parent, attr)  # back to the class method
        engine.reset()
    return seen


def make_calibrator(eager_engine: Any, path: str, outputs: int = 8
                    ) -> Callable[[tuple], list[tuple]]:
    """int8 calibration source for one target: simulated blinking frames of the signature's
    size, streamed through an eager twin of the engine, inputs of ``path`` recorded."""
    def calibrate(args: tuple) -> list[tuple]:
        first = next(x for x in tree_flatten(list(args))[0] if isinstance(x, torch.Tensor))
        h, w = int(first.shape[-2]), int(first.shape[-1])
        stack = simulated_stack(max(h, w), eager_engine.window + outputs - 1, seed=1)[:, :h, :w]
        sig = _signature(args)
        return [a for a in record_target_inputs(eager_engine, path, stack) if _signature(a) == sig]
    return calibrate

