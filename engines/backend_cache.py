"""On-disk cache for compiled models and for the `backend="auto"` choices.

Why a cache: building a TensorRT engine or exporting ONNX takes seconds to minutes, and timing
every backend for `auto` takes longer still; a microscopist restarting the viewer should not pay
that twice. Why these keys: a compiled artefact is only valid for the exact weights, input
shapes, precision, device model and library versions it was built with, so all of them go into
the key and a change in any one of them simply misses the cache (never loads a wrong engine).

Location: `$LIVESR_CACHE` if set, else the user cache dir (platformdirs: `~/.cache/livesr`
on Linux).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

AUTO_CHOICES_FILE = "auto_backends.json"
_LOCK = threading.Lock()


def cache_dir() -> Path:
    """The cache root (created on first use)."""
    import platformdirs

    root = os.environ.get("LIVESR_CACHE")
    path = Path(root).expanduser() if root else Path(platformdirs.user_cache_dir("livesr"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_name(device: str | torch.device) -> str:
    """Human-readable name of the device a model runs on: GPU model or CPU model."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return cpu_name()


def library_versions() -> dict[str, str]:
    """Versions of every library whose change invalidates a compiled artefact."""
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.version.cuda:
        versions["cuda"] = str(torch.version.cuda)
    for mod in ("torch_tensorrt", "tensorrt", "onnxruntime", "onnx"):
        try:
            versions[mod] = str(__import__(mod).__version__)
        except Exception:  # noqa: BLE001 - absent or broken: it is simply not part of the key
            continue
    return versions


def module_fingerprint(module: nn.Module) -> str:
    """Hash of a module's class, structure and exact parameter/buffer values."""
    h = hashlib.sha256()
    h.update(type(module).__qualname__.encode())
    h.update(repr(module).encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()[:16]


def artefact_key(*, module_hash: str, signature: str, backend: str, precision: str,
                 device: str | torch.device, extra: dict[str, Any] | None = None) -> str:
    """Stable short key for one compiled artefact (model x shape x precision x device x versions)."""
    payload = {
        "module": module_hash, "signature": signature, "backend": backend,
        "precision": precision, "device": device_name(device),
        "versions": library_versions(), "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def artefact_path(key: str, suffix: str) -> Path:
    """Where a compiled artefact with this key lives (folder per backend kind)."""
    folder = cache_dir() / "artefacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}{suffix}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written artefact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- auto choices


def _choices_path() -> Path:
    return cache_dir() / AUTO_CHOICES_FILE


def load_auto_choices() -> dict[str, Any]:
    """All remembered auto choices; a corrupt file is treated as empty (and later rewritten)."""
    path = _choices_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def auto_choice_key(*, engine: str, target: str, signature: str, device: str | torch.device,
                    precision: str, module_hash: str) -> str:
    """Key of one auto decision: what was measured, where, with which library versions."""
    versions = library_versions()
    return "|".join([engine, target, signature, device_name(device), precision, module_hash,
                     "torch=" + versions["torch"],
                     "ort=" + versions.get("onnxruntime", "-"),
                     "trt=" + versions.get("torch_tensorrt", "-")])


def get_auto_choice(key: str) -> dict[str, Any] | None:
    entry = load_auto_choices().get(key)
    return entry if isinstance(entry, dict) and "backend" in entry else None


#: measurements kept per decision (newest last)
AUTO_HISTORY = 5


def store_auto_choice(key: str, entry: dict[str, Any]) -> Path:
    """Add/replace one decision, keeping the last AUTO_HISTORY measurements of that key in
    ``entry["history"]`` (read-modify-write under a process lock, atomic rename)."""
    with _LOCK:
        data = load_auto_choices()
        old = data.get(key)
        if not isinstance(old, dict):
            old = {}
        history = list(old.get("history", [])) + [{
            k: entry[k] for k in ("backend", "timings_ms", "measured_utc") if k in entry}]
        data[key] = {**entry, "history": history[-AUTO_HISTORY:]}
        path = _choices_path()
        atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode())
    return path


def count_auto_use(key: str) -> int:
    """One more use of a remembered decision; returns the new count."""
    with _LOCK:
        data = load_auto_choices()
        entry = data.get(key)
        if not isinstance(entry, dict):
            return 0
        entry["uses"] = int(entry.get("uses", 0)) + 1
        atomic_write_bytes(_choices_path(), json.dumps(data, indent=2, sort_keys=True).encode())
    return entry["uses"]
