"""What a benchmark ran on (CPU, cores, torch, GPU, libraries, load, commit): named in every output.

Its own module so that every benchmark can name the machine without importing another
benchmark (latency.py and pipeline_bench.py imported each other for it).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["machine_info", "machine_line"]


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on (named in every output)."""
    import torch

    from engines.backend_cache import cpu_name, library_versions

    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "libraries": library_versions(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    load = m.get("loadavg_start")
    load_s = f", load avg {load[0]:.1f}" if load else ""
    return (f"machine: {m['cpu']} ({m['cores']} cores{load_s}){gpu}; torch {m['torch']}, "
            f"device {m['device']}, {m['date_utc']}")
