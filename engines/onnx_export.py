"""ONNX export of a neural engine: `livesr export --engine convgru --size 128 --out model.onnx`.

Why: an ONNX file lets the trained network run outside Python/PyTorch (ONNX Runtime, TensorRT's
trtexec, other viewers). The whole network is exported for one fixed frame size (the recurrence
over the window is unrolled), checked against eager fp32 with onnxruntime when it is installed,
and the per-frame normalisation it expects is written into the file's metadata.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from engines import backends as B


def export_onnx(engine: Any, size: int, out: Any, *, check: bool = True) -> dict[str, Any]:
    """Export the engine's whole network (normalised (1, window, H, W) frames -> SR image) to
    ONNX and, when onnxruntime is installed, check it against eager fp32 on simulated frames.

    Normalisation stays outside the graph (per-frame median/MAD, see nn_common.NormConfig);
    its parameters are written into the model's metadata so other tools can reproduce it.
    """
    why = B.import_error("onnx")
    if why:
        raise B.BackendUnavailable(f"unavailable: ONNX export needs the 'onnx' package "
                                   f"({why}); pip install 'livesr[onnx]'")
    import onnx

    model = getattr(engine, "model", None)
    if not isinstance(model, nn.Module):
        raise B.BackendUnavailable(f"unavailable: engine {getattr(engine, 'name', '?')!r} has "
                                   "no neural network to export (SOFI is computed, not learned)")
    model = copy.deepcopy(model).float().cpu().eval()
    frames = torch.from_numpy(B.simulated_stack(size, engine.window).astype("float32"))
    norm = getattr(engine, "norm", None)
    if norm is not None:
        from engines.nn_common import normalise_frames

        frames = normalise_frames(frames, norm)
    args = (frames[None].contiguous(),)
    flat = B.FlatModule(model, args).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    B.export_onnx_file(flat, flat.example_args(args), tmp)
    proto = onnx.load(str(tmp))
    meta = {"livesr_engine": str(engine.name), "window": str(engine.window),
            "size": str(size), "upsample": str(getattr(engine, "upsample", 2)),
            "input": "float32 (1, window, H, W) frames normalised per frame by median/MAD",
            "norm": json.dumps(asdict(norm) if is_dataclass(norm) and not isinstance(norm, type) else {}),
            # what the raw output means: image = (max(out, 0) * mean frame scale)^2 in ADU^2
            # ("sqrt_over_scale"); absent for legacy weights (arbitrary units)
            "output": json.dumps((getattr(engine, "config", None) or {}).get("output") or {}),
            "torch": torch.__version__}
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(tmp))
    tmp.replace(out)
    info: dict[str, Any] = {"path": str(out), "bytes": out.stat().st_size, **meta}
    if check:
        if B.import_error("onnxruntime"):
            info["check"] = "skipped: onnxruntime not installed"
        else:
            import onnxruntime as ort

            sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), flat.flat_args(args), strict=True)}
            got = [torch.from_numpy(o) for o in sess.run(None, feed)]
            with torch.no_grad():
                ref = list(flat(*flat.flat_args(args)))
            max_abs, max_rel = B.compare(got, ref)
            info.update(max_abs=max_abs, max_rel=max_rel, tolerance=B.TOLERANCE["fp32"])
            if max_rel > B.TOLERANCE["fp32"]:
                raise B.BackendMismatch(f"exported ONNX deviates from eager by max rel {max_rel:.3g}")
            info["check"] = "ok"
    return info


def export_cli(*, engine: str, size: int, out: str, weights: str | None, window: int | None,
               check: bool) -> int:
    """`livesr export --engine convgru --size 128 --out model.onnx` (realtime/cli_tools.py)."""
    if size < 4:
        print(f"livesr export: error: --size must be >= 4, got {size}", file=sys.stderr)
        return 2
    why = B.import_error("onnx")
    if why:
        print(f"unavailable: ONNX export needs the 'onnx' package, which is not installed "
              f"({why}). Install it with: pip install 'livesr[onnx]'")
        return 2
    from engines import load_engine

    try:
        net = load_engine(engine, weights=weights, window=window)
        info = export_onnx(net, size, out, check=check)
    except (B.BackendError, ValueError, RuntimeError, ImportError) as e:
        print(f"export failed: {e}")
        return 1
    print(json.dumps(info, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engines.onnx_export ARGS` = `livesr export ARGS`."""
    from realtime.cli import main as livesr

    return livesr(["export", *(sys.argv[1:] if argv is None else argv)])
