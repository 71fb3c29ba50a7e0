#!/usr/bin/env bash
# Every GPU number of issue 13 in one prepared run on a bare CUDA machine (well under 10 min).
#
# Here (internet):   bash benchmarks/gpu_wheels.sh          # wheels the GPU image lacks -> .whl/
# There (device):    bash benchmarks/gpu_check.sh [OUTDIR]  # OUTDIR defaults to $OUT, else ./gpu_out
#
# Steps (each logged to OUTDIR/gpu_check.log; a failing step is reported and the next one runs,
# and the script exits non-zero at the end if any step failed):
#   1. the unit tests marked `gpu`;
#   2. `livesr bench --device cuda`: ConvGRU window, ConvLSTM step, streaming SOFI at 128-1024 px,
#      eager fp32 / fp16 / bf16 / channels_last / compile / compile-cudagraphs / tensorrt
#      (tensorrt rows say "unavailable: why" when torch-tensorrt is absent);
#   3. the live pipeline headless with a CUDA engine (simulated camera), latency p50/p99, outputs/s;
#   4. 200 training steps of each network at the gpu preset, to time a full run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-gpu_out}}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 QT_QPA_PLATFORM=offscreen
failed=()

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/livesr_site .whl/*.whl || { echo "gpu_check: wheel install failed" | tee -a "$LOG"; exit 2; }
    export PYTHONPATH="/tmp/livesr_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
LIVESR=("$PY" -c "import sys; from realtime.cli import main; sys.exit(main())")

if ! "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"; then
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: unavailable: torch sees no CUDA device")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
import realtime.cli  # fails here, with the module's name, if a wheel is missing
EOF
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUTDIR/gpu.csv" 2>&1 || true

step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date -u +%H:%M:%S))" | tee -a "$LOG"
    if ! timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; then
        echo "=== $name FAILED" | tee -a "$LOG"; failed+=("$name")
    fi
}

step "1 gpu tests" 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
step "2 latency" 240 "${LIVESR[@]}" bench --device cuda --engines convgru,convlstm,sofi \
    --backends eager,channels_last,compile,compile-cudagraphs,tensorrt --precisions fp32,fp16,bf16 \
    --sizes 128,256,512,1024 --modes window,push --camera-fps 100,1000 --interleave \
    --max-seconds 3 --reps 200 --out-dir "$OUTDIR" --stem latency_cuda
step "3 pipeline" 120 "${LIVESR[@]}" bench --pipeline --device cuda --engines convgru,convlstm,sofi \
    --sizes 256,512 --camera-fps 200,1000 --seconds 8 --out-dir "$OUTDIR" --stem pipeline_cuda
for m in convgru convlstm; do
    step "4 train $m" 90 "${LIVESR[@]}" train --model "$m" --config gpu --device cuda --steps 200 \
        --eval-every 1000 --out "$OUTDIR/train_$m"
    # keep what comes back small: the log with step times, not the checkpoints
    cp "$OUTDIR/train_$m/log.jsonl" "$OUTDIR/train_${m}_log.jsonl" 2>/dev/null; rm -rf "$OUTDIR/train_$m"
done

if ((${#failed[@]})); then
    echo "gpu_check: FAILED steps: ${failed[*]} (see $LOG)" | tee -a "$LOG"; exit 1
fi
echo "gpu_check: all steps ran; results in $OUTDIR" | tee -a "$LOG"
