#!/usr/bin/env bash
# One short prepared GPU check: the three stages in bf16 (gpu_smoke.py), then the mask-search step
# benchmark in fp32 and bf16. Needs torch, lightning, torchmetrics, scikit-learn on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY benchmarks/gpu_smoke.py "$@"
$PY benchmarks/mask_search_step.py --precision 32-true
$PY benchmarks/mask_search_step.py --precision bf16-mixed
