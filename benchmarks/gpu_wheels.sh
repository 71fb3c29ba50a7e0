#!/usr/bin/env bash
# Download, on a machine with pip and internet, the wheels benchmarks/gpu_check.sh needs on a
# bare GPU machine that has PyTorch with CUDA but no package registry (Python 3.12, x86-64).
# They go into .whl/ (git-ignored through .git/info/exclude); carry that folder to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}
# livesr's runtime and test needs that the GPU image lacks (its torch, numpy, scipy, tifffile,
# scikit-image, matplotlib, tqdm, pytest, typer, rich are used as they are there)
PKGS=(pymmcore-plus pymmcore useq-schema pydantic pydantic-core annotated-types typing-inspection
      pyzmq psygnal platformdirs msgspec ome-writers ome-types xsdata zarr numcodecs donfig crc32c
      mm-test-adapters pytest-timeout)
for pkg in "${PKGS[@]}"; do
    ver=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg" 2>/dev/null || true)
    spec=$pkg${ver:+==$ver}
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        --platform any -d .whl "$spec"; then
        echo "gpu_wheels: could not download $spec (gpu_check.sh will say what is missing)" >&2
    fi
done
du -sh .whl
