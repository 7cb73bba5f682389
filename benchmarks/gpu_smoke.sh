#!/usr/bin/env bash
# One short prepared GPU check (about 8 minutes on an H200): images/s of every stage at batch 512 and
# 128 with and without `compile` and training-precision attacks, and the S2AP/HYDRA step-time ratio
# in fp32 and bf16 (gpu_throughput.py; runs in priority order under --deadline). Needs torch,
# lightning and torchmetrics on the machine. Results: a table at the end, and one JSON line per run in
# $OUT/gpu_throughput.jsonl (or ./gpu_throughput.jsonl). `gpu_smoke.py` chains the three stages with
# validation for a functional check.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
$PY benchmarks/gpu_throughput.py --out "${OUT:-.}/gpu_throughput.jsonl" "$@"
