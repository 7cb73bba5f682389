#!/usr/bin/env bash
# The user's path on a GPU with the large-batch preset: `s2ap fit` of the three stages and `s2ap test`
# through the real CLI (configs composed as a user would), ResNet-18 on CIFAR-shaped synthetic data,
# batch 512, compile + training-precision attacks; validation and test stay eager and fp32.
# A functional check with wall times, not a benchmark. SIZE=tiny ACCEL=cpu runs it on a laptop.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
ACCEL=${ACCEL:-gpu}
RUNS=${RUNS:-/tmp/s2ap_gpu_cli_check}
if [ "${SIZE:-full}" = tiny ]; then
  SIZE_ARGS=(--data.batch_size 32 --data.synthetic_samples 256 --data.synthetic_image_size 8
             --model.init_args.model small_cnn)
else
  SIZE_ARGS=(--data.batch_size 512 --data.synthetic_samples 4096 --data.synthetic_image_size 32
             --model.init_args.model resnet18)
fi
COMMON=(--config configs/data/synthetic.yaml --config configs/trainer/gpu_large_batch.yaml
        --trainer.accelerator "$ACCEL" "${SIZE_ARGS[@]}" --model.init_args.threat.eps 0.0314
        --model.init_args.threat.step_size 0.0078 --model.init_args.threat.steps 10
        --model.init_args.evaluation.aa_images 0 --trainer.enable_progress_bar false)
s2ap() { "$PY" -c "import sys; from s2ap_lightning.cli import main; sys.exit(main())" "$@"; }
stage() {  # name, stage config, epochs, extra args...
  local name=$1 config=$2 epochs=$3; shift 3
  local start=$SECONDS
  s2ap fit --config "configs/stages/$config.yaml" "${COMMON[@]}" --trainer.max_epochs "$epochs" \
    --checkpoint.dirpath "$RUNS/$name" --overwrite true "$@"
  echo "== $name: $((SECONDS - start)) s"
}
EPOCHS=${EPOCHS:-1}
stage pretrain pretrain "$EPOCHS"
stage s2ap s2ap "$EPOCHS" --model.init_args.init_from "$RUNS/pretrain/best.ckpt" --model.init_args.warmup_epochs 0
stage finetune finetune 1 --model.init_args.init_from "$RUNS/s2ap/best.ckpt"
start=$SECONDS
s2ap test --config configs/stages/finetune.yaml "${COMMON[@]}" --ckpt_path "$RUNS/finetune/best.ckpt"
echo "== test: $((SECONDS - start)) s"
