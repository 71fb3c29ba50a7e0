"""scripts/install.sh picks the torch build the README promises (issue 15, "Also").

Runs the real script against a stand-in interpreter and nvidia-smi (so nothing is downloaded):
every pip call is logged, and the CPU wheel index can be made to fail.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$LOG"
case "$*" in
  "-c import torch") [ -f "$STATE/torch" ] && exit 0 || exit 1 ;;
  *"--index-url https://cpu.invalid/whl"*) [ -n "$CPU_INDEX_WORKS" ] && touch "$STATE/torch" && exit 0; exit 1 ;;
  *"install -q torch"*) touch "$STATE/torch"; exit 0 ;;
  -c*) echo "[install] torch 2.13.0 (stand-in)"; exit 0 ;;
  *) exit 0 ;;
esac
"""


def _run(tmp_path: Path, *, driver: bool, cpu_index_works: bool) -> tuple[str, list[str]]:
    venv, bin_dir, state = tmp_path / "venv", tmp_path / "bin", tmp_path / "state"
    for d in (venv / "bin", bin_dir, state):
        d.mkdir(parents=True, exist_ok=True)
    py = venv / "bin" / "python"
    py.write_text(FAKE_PYTHON)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit %d\n" % (0 if driver else 9))
    for f in (py, smi):
        f.chmod(0o755)
    log = tmp_path / "pip.log"
    env = {**os.environ, "LIVESR_VENV": str(venv), "LOG": str(log), "STATE": str(state),
           "LIVESR_CPU_INDEX": "https://cpu.invalid/whl", "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "CPU_INDEX_WORKS": "1" if cpu_index_works else ""}
    env.pop("LIVESR_TORCH", None)
    env.pop("LIVESR_TORCH_INDEX", None)
    run = subprocess.run(["bash", str(REPO / "scripts" / "install.sh")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout, log.read_text().splitlines()


def test_without_a_driver_the_cpu_index_is_asked_first_with_a_short_timeout(tmp_path):
    out, calls = _run(tmp_path, driver=False, cpu_index_works=True)
    installs = [c for c in calls if c.startswith("-m pip install") and "torch" in c]
    assert installs == ["-m pip install -q --timeout 15 --retries 0 --index-url "
                        "https://cpu.invalid/whl torch==2.13.0"]
    assert "no NVIDIA driver: asking https://cpu.invalid/whl for the CPU build" in out
    assert "[install] torch 2.13.0" in out  # the script says which build it installed
    assert calls[-1] == "-m pip install -q -e .[test]"


def test_an_unreachable_cpu_index_falls_back_to_the_default_one(tmp_path):
    out, calls = _run(tmp_path, driver=False, cpu_index_works=False)
    installs = [c for c in calls if c.startswith("-m pip install") and "torch" in c]
    assert len(installs) == 2 and "--index-url https://cpu.invalid/whl" in installs[0]
    assert installs[1] == "-m pip install -q torch==2.13.0"
    assert "falling back to the default index" in out


@pytest.mark.parametrize("driver", [True])
def test_with_a_driver_the_default_cuda_build_is_installed(tmp_path, driver):
    out, calls = _run(tmp_path, driver=driver, cpu_index_works=True)
    installs = [c for c in calls if c.startswith("-m pip install") and "torch" in c]
    assert installs == ["-m pip install -q torch>=2.4"] and "NVIDIA driver found" in out
