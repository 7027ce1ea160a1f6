#!/usr/bin/env bash
# The QKS ViT-B-16 image path in PyTorch on one NVIDIA GPU: correctness, then speed.
#
#   benchmarks/gpu/run.sh WHEELS_DIR RESULTS_DIR [bench_torch.py options...]
#
# For a machine whose python3 has torch with CUDA (and torchvision, timm, regex, huggingface_hub,
# safetensors, as the workplace's GPU image has) but maybe not open_clip: every wheel in WHEELS_DIR
# is installed offline (pip --no-index --no-deps) into a private target folder, nothing from the
# network. open_clip_torch==3.3.0, ftfy and wcwidth are what that image lacks. Then it runs
# bench_torch.py (fp32 / TF32 / fp16 / bf16 autocast, SDPA vs math attention, CUDA-graph replay,
# torch.compile; batch 1..256) and writes RESULTS_DIR/gpu_bench.json and gpu_bench.md.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 WHEELS_DIR RESULTS_DIR [bench_torch.py options]" >&2
  exit 2
fi
WHEELS=$1
RESULTS=$2
shift 2
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
mkdir -p "$RESULTS"

"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'GPU', torch.cuda.get_device_name(0) if ok else None); sys.exit(0 if ok else 1)" \
  || { echo "run.sh: torch sees no CUDA GPU here" >&2; exit 1; }

if ! "$PY" -c "import open_clip, ftfy" 2>/dev/null; then
  if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    SITE=${QKS_WHEEL_SITE:-/tmp/qks-gpu-site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
missing=$("$PY" - <<'PY'
import importlib
bad = []
for m in ("open_clip", "ftfy", "torchvision", "timm", "regex", "huggingface_hub", "safetensors"):
    try:
        importlib.import_module(m)
    except Exception as e:
        bad.append(f"{m} ({type(e).__name__}: {e})")
print("; ".join(bad))
PY
)
if [ -n "$missing" ]; then
  echo "run.sh: cannot import: $missing -- put its wheel in $WHEELS" >&2
  exit 1
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$RESULTS/nvidia-smi.csv" 2>/dev/null || true
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$ROOT"
"$PY" "$HERE/bench_torch.py" --out "$RESULTS" "$@" 2>&1 | tee "$RESULTS/log.txt"
