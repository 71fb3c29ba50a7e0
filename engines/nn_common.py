"""Building blocks shared by the neural engines (ConvGRU, ConvLSTM).

Why one module: the encoder, the normalisation and the weights format must be identical at
training and inference time, and identical between the two models, so they live here once.
"""

from __future__ import annotations

import datetime as _dt
import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engines.base import EngineBase

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FORMAT = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable, or does not fit the model it is loaded into."""


# --------------------------------------------------------------------------- normalisation


@dataclass
class NormConfig:
    """Robust per-frame intensity normalisation, independent of camera offset and gain.

    x -> (x - median) / (unit * 1.4826 * MAD): the median is the camera offset plus the
    background (blinking frames are sparse), the MAD the background noise, so the network
    sees signal in units of noise sigma whatever the camera offset, gain or EM gain.
    Per FRAME (not per window) so that a frame's encoding never changes once computed: the
    ConvGRU caches encoded frames in its rolling window and the ConvLSTM needs no look-ahead.
    """

    unit: float = 10.0          # noise sigmas per unit of network input
    min_rel_scale: float = 1e-3  # floor on the scale relative to the frame range (noise-free data)
    eps: float = 1e-6


def _kth(x: torch.Tensor, q: float) -> torch.Tensor:
    """q-quantile (0..1) along the last dim via kthvalue (no size limit, deterministic)."""
    n = x.shape[-1]
    k = min(max(int(round(q * (n - 1))) + 1, 1), n)
    return x.kthvalue(k, dim=-1).values


def normalise_with_scale(frames: torch.Tensor, cfg: NormConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise each (H, W) frame of a (..., H, W) tensor by its own median and MAD; also
    return each frame's scale (..., ) in input units (ADU), which maps outputs back."""
    lead = frames.shape[:-2]
    flat = frames.reshape(-1, frames.shape[-2] * frames.shape[-1]).float()
    med = _kth(flat, 0.5)
    dev = flat - med[:, None]
    mad = _kth(dev.abs(), 0.5) * 1.4826
    rng = flat.amax(dim=-1) - flat.amin(dim=-1)
    scale = torch.maximum(mad, cfg.min_rel_scale * rng).clamp_min(cfg.eps) * cfg.unit
    normed = (dev / scale[:, None]).reshape(*lead, frames.shape[-2], frames.shape[-1])
    return normed, scale.reshape(lead)


def normalise_frames(frames: torch.Tensor, cfg: NormConfig) -> torch.Tensor:
    """Normalise each (H, W) frame of a (..., H, W) tensor by its own median and MAD."""
    return normalise_with_scale(frames, cfg)[0]


# --------------------------------------------------------------------------- output


@dataclass
class OutputConfig:
    """What the network's output means (stored in the weights file as "output").

    The target is the expected second-order cumulant image in ADU^2 (what SOFI of infinitely
    many noise-free frames shows, acquisition.simulation.BlinkingScene.expected_cumulant).
    The network predicts a = sqrt(target) / s, s the mean normalisation scale of the frames
    that make the output (ConvGRU: its window; ConvLSTM: the trailing `warmup` frames), so
    the loss sees values in units of noise whatever the camera, and the engine returns
    (max(a, 0) s)^2 in ADU^2, directly comparable with the `sofi` engine's output.
    """

    target: str = "expected_cumulant2"
    representation: str = "sqrt_over_scale"
    units: str = "ADU^2"


OUTPUT = OutputConfig()
LEGACY_NOTE = ("legacy weights (no 'output' key: trained towards the old target, every emitter "
               "blurred with half the PSF, which rewards drawing structure the data do not "
               "carry); outputs are in arbitrary units, not ADU^2. Retrain with `livesr train`.")


def encode_target(target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Target in ADU^2 (..., H, W) -> network representation sqrt(target) / scale (...)."""
    return target.clamp_min(0).sqrt() / scale[..., None, None]


def decode_output(a: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Network output a (..., H, W) -> ADU^2: (max(a, 0) * scale)^2."""
    s = scale[..., None, None] if isinstance(scale, torch.Tensor) else scale
    return (a.clamp_min(0) * s).square()


def trailing_mean(scales: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over the last `window` entries (fewer at the start) along dim 1 of (B, T): the
    ConvLSTM's output scale at every frame, as its engine keeps it."""
    c = torch.cumsum(scales.double(), dim=1)
    shifted = torch.zeros_like(c)
    shifted[:, window:] = c[:, :-window]
    n = torch.clamp(torch.arange(1, scales.shape[1] + 1, device=scales.device), max=window)
    return ((c - shifted) / n).to(scales.dtype)


def is_legacy(config: dict[str, Any]) -> bool:
    """A weights config from a file written before outputs were cumulants (no "output" key)."""
    return bool(config) and "output" not in config


# --------------------------------------------------------------------------- layers


def conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class ResidualBlock(nn.Module):
    """Two 3x3 convs with PReLU and an identity skip (thesis 4.1.1)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = conv3(ch, ch)
        self.act1 = nn.PReLU(ch)
        self.conv2 = conv3(ch, ch)
        self.act2 = nn.PReLU(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(x + self.conv2(self.act1(self.conv1(x))))


class FrameEncoder(nn.Module):
    """Per-frame encoder: 3x3 conv + PReLU, residual blocks, final 3x3 conv."""

    def __init__(self, ch: int, n_res: int = 2):
        super().__init__()
        self.head = nn.Sequential(conv3(1, ch), nn.PReLU(ch))
        self.blocks = nn.Sequential(*[ResidualBlock(ch) for _ in range(n_res)])
        self.tail = conv3(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 1, H, W) normalised -> (N, ch, H, W)."""
        return self.tail(self.blocks(self.head(x)))


class Decoder(nn.Module):
    """Upsampling decoder: ConvTranspose2d x upsample, two 3x3 conv + PReLU, 1x1 projection."""

    def __init__(self, ch: int, upsample: int = 2):
        super().__init__()
        self.up = nn.ConvTranspose2d(ch, ch, kernel_size=upsample, stride=upsample)
        self.body = nn.Sequential(conv3(ch, ch), nn.PReLU(ch), conv3(ch, ch), nn.PReLU(ch))
        self.proj = nn.Conv2d(ch, 1, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (N, ch, H, W) -> (N, 1, uH, uW); output pixel (2i..2i+1) covers input pixel i."""
        return self.proj(self.body(self.up(h)))


def count_conv_macs(module: nn.Module, fn) -> int:
    """Multiply-accumulates of every Conv2d / ConvTranspose2d in `module` while fn() runs
    (elementwise gate arithmetic is left out: < 2% of the total here)."""
    total = 0

    def hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))  # (registered on those only)
        if isinstance(m, nn.ConvTranspose2d):
            total += inp[0].numel() * m.weight[0].numel()  # each input value hits cout*k*k
        else:
            total += out.numel() * m.weight[0].numel()  # each output value sums cin*k*k

    hooks = [m.register_forward_hook(hook) for m in module.modules()
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return total


def xavier_init(model: nn.Module) -> None:
    """Xavier-uniform weights, zero biases (thesis: needed for convergence with sigmoid gates)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- losses


def pearson_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean (1 - Pearson r) over images; images whose target is flat (no structure) are skipped."""
    p = pred.flatten(-2).float()
    t = target.flatten(-2).float()
    p = p - p.mean(-1, keepdim=True)
    t = t - t.mean(-1, keepdim=True)
    tn = t.norm(dim=-1)
    ok = tn > 1e-6
    if not bool(ok.any()):
        return pred.new_zeros(())
    r = (p * t).sum(-1) / (p.norm(dim=-1) * tn).clamp_min(1e-8)
    return (1 - r[ok]).mean()


def combined_loss(pred: torch.Tensor, target: torch.Tensor, *, mse_weight: float = 1.0,
                  l1_weight: float = 0.0, pearson_weight: float = 0.0,
                  image_floor: float = 0.0) -> torch.Tensor:
    """Per-pixel MSE (+ optional L1 and (1 - Pearson)) on the network representation.

    Why MSE: its minimiser is the conditional mean, the honest estimate where the data are
    ambiguous (a faint haze, not a confident guess). A small L1 term pulls the many pixels
    whose target is exactly zero (nothing blinks there) to zero. The thesis's Fourier phase
    term is gone: it rewards sharp edges whether or not the data support them.

    `image_floor` > 0 makes the terms relative per image (each (..., H, W) slice): MSE over
    (mean target^2 + floor^2), L1 over (rms target + floor). Targets span a factor ~20 in
    rms over the training domain (40-1000 photons, on-ratios 0.2-5 %), so a plain MSE would
    learn almost only from the brightest scenes; the floor keeps images whose target is
    zero (static, empty) weighted strongly, so any output there costs.
    """
    loss = pred.new_zeros(())
    err = pred.float() - target.float()
    t = target.float()
    if mse_weight:
        se = err.square()
        if image_floor:
            se = se / (t.square().mean((-2, -1), keepdim=True) + image_floor**2)
        loss = loss + mse_weight * se.mean()
    if l1_weight:
        ae = err.abs()
        if image_floor:
            ae = ae / (t.square().mean((-2, -1), keepdim=True).sqrt() + image_floor)
        loss = loss + l1_weight * ae.mean()
    if pearson_weight:
        loss = loss + pearson_weight * pearson_loss(pred, target)
    return loss


# --------------------------------------------------------------------------- weights I/O


def config_from_dict(cls: type, d: dict[str, Any]):
    """Build dataclass `cls` from a dict, ignoring unknown keys (forward compatibility)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def save_weights(path: str | Path, model: nn.Module, *, model_name: str, arch: Any,
                 norm: NormConfig, training: dict[str, Any] | None = None) -> Path:
    """Save state_dict + a JSON-serialisable config that rebuilds the exact model and says
    what its output means ("output": OutputConfig, the current representation)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "format": WEIGHTS_FORMAT,
        "model": model_name,
        "arch": asdict(arch),
        "norm": asdict(norm),
        "output": asdict(OUTPUT),
        "training": training or {},
        "saved_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # plain JSON types only: str subclasses such as torch.__version__ (TorchVersion) would be
    # pickled as their class and then refused by torch.load(weights_only=True)
    config = json.loads(json.dumps(config))
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"config": config, "state_dict": state}, tmp)
    tmp.replace(path)
    return path


def read_weights(path: str | Path, model_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a weights file; every failure becomes a WeightsError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (train one with `livesr train "
                           f"--model {model_name}`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (BadZipFile, EOFError, Unpickling...)
        raise WeightsError(f"weights file {path} is corrupt or truncated: "
                           f"{type(e).__name__}: {e}") from e
    if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
        raise WeightsError(f"weights file {path} is not a livesr weights file "
                           "(expected keys 'config' and 'state_dict')")
    config = blob["config"]
    if config.get("model") != model_name:
        raise WeightsError(f"weights file {path} holds a {config.get('model')!r} model, "
                           f"not {model_name!r}")
    out = config.get("output")
    if out is not None and (not isinstance(out, dict)
                            or any(out.get(k) != v for k, v in asdict(OUTPUT).items())):
        raise WeightsError(f"weights file {path} has outputs of kind {out!r}; this livesr maps "
                           f"only {asdict(OUTPUT)} back to images")
    return config, blob["state_dict"]


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """load_state_dict with a clear error naming the file on missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected keys {extra[:5]}{'...' if len(extra) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}")
        raise WeightsError(f"weights file {path} does not match the model architecture: "
                           + "; ".join(parts))
    model.load_state_dict(state)


def build_from_config(net_cls: type, arch_cls: type, config: dict | None = None) -> tuple[nn.Module, NormConfig]:
    """Rebuild a network + its input normalisation from a weights-file config dict (or defaults)."""
    config = config or {}
    arch = config_from_dict(arch_cls, config.get("arch", {}))
    norm = config_from_dict(NormConfig, config.get("norm", {}))
    return net_cls(arch), norm


def load_trained(path: str | Path, model_name: str, build) -> tuple[nn.Module, NormConfig, dict]:
    """Load a trained network with `build(config)`; WeightsError naming the file on any problem."""
    config, state = read_weights(path, model_name)
    try:
        model, norm = build(config)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"weights file {path} has an unusable config: {e}") from e
    load_state_checked(model, state, path)
    model.eval()
    return model, norm, config


def describe_weights(config: dict[str, Any]) -> str:
    """One short line of where a weights file came from (its "training" provenance)."""
    if is_legacy(config):
        return "legacy weights (old target, arbitrary units)"
    training = config.get("training") or {}
    ft = training.get("finetune")
    if isinstance(ft, dict):
        names = [r.get("name", "?") for r in ft.get("recordings", [])]
        agree = ft.get("heldout_agreement") or {}
        before = (agree.get("before") or {}).get("pearson")
        after = (agree.get("after") or {}).get("pearson")
        base = (ft.get("base_weights") or {}).get("name", "?")
        text = (f"fine-tuned on {', '.join(names) or '?'} ({ft.get('frames', '?')} frames, "
                f"{ft.get('steps', '?')} steps) from {base}")
        if isinstance(before, (int, float)) and isinstance(after, (int, float)):
            text += f"; held-out agreement with long SOFI {before:.2f} -> {after:.2f}"
        worse = (ft.get("forgetting_check") or {}).get("worse")
        if worse:
            text += "; worse on simulated scenes (specialised to that sample)"
        return text
    if training:
        val = training.get("val_pearson")
        return (f"trained on simulations, {training.get('final_step', '?')} steps"
                + (f", val Pearson {val:.2f}" if isinstance(val, (int, float)) else ""))
    return "no provenance recorded"


def describe_weights_file(path: str | Path, model_name: str | None = None) -> str:
    """`describe_weights` of a file (any model when `model_name` is None), or why it cannot
    be read; never raises for a bad file."""
    try:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        config = blob["config"]
        if model_name is not None and config.get("model") != model_name:
            return f"holds a {config.get('model')!r} model, not {model_name!r}"
        return f"{config.get('model')}: {describe_weights(config)}"
    except Exception as e:  # unreadable, truncated, not a livesr file
        return f"not a livesr weights file ({type(e).__name__})"


class LegacyWeightsWarning(UserWarning):
    """A weights file from before outputs were cumulant images (see LEGACY_NOTE)."""


class NetworkEngine(EngineBase):
    """What both neural engines share: the model on the device in the chosen precision
    (channels_last: oneDNN runs these few-channel convolutions ~5x faster on CPU), the input
    normalisation, the weights file's config and the mapping of outputs back to ADU^2.

    `legacy` is True for a weights file without an "output" key: its raw output is returned
    as it is (arbitrary units) and a LegacyWeightsWarning says so once, at load.
    """

    learned = True

    def __init__(self, model: nn.Module, norm: NormConfig | None, config: dict, window: int, *,
                 upsample: int, device: str, precision: str, weights_path: str | Path | None = None):
        super().__init__(window, device=device, precision=precision)
        self.config = config
        self.weights_path = None if weights_path is None else Path(weights_path)
        self.model_dtype = DTYPES[precision]
        # (Module.to takes memory_format at run time; torch's stubs omit it)
        self.model = model.to(self.device, self.model_dtype,
                              memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
        self.norm = norm or NormConfig()
        self.upsample = upsample
        self.legacy = is_legacy(config)
        self.output_units = "arbitrary (legacy weights)" if self.legacy else OUTPUT.units
        if self.legacy:
            warnings.warn(f"{self.name}: {LEGACY_NOTE}", LegacyWeightsWarning, stacklevel=3)

    def output_info(self) -> dict[str, Any]:
        """Which weights make the outputs and where they came from (ResultHeader.info)."""
        if self.weights_path is None:
            return {}
        return {"weights": self.weights_path.name, "weights_note": describe_weights(self.config)}

    def _output(self, a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Raw network output (uH, uW) and its scale -> the engine's image (ADU^2)."""
        return a.float() if self.legacy else decode_output(a.float(), scale.float())
