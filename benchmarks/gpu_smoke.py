"""Three stages on CIFAR-shaped synthetic data in bf16 on one GPU: throughput of each stage.

Prints the GPU's name and images per second (training steps only, first steps skipped) for robust
pretraining, HYDRA search, S2AP search and masked finetuning, then a PGD evaluation of the result.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import StepTimer, bench_trainer, device_name  # noqa: E402

from s2ap_lightning.attacks import ThreatModel  # noqa: E402
from s2ap_lightning.data import RobustDataModule  # noqa: E402
from s2ap_lightning.stages import MaskedFinetuner, RobustPretrainer, ScoreSpaceSAMPruner  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batches", type=int, default=24, help="training batches per stage")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--accelerator", default="gpu", help="cpu: a dry run of this script")
    args = parser.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        sys.exit("gpu_smoke: no CUDA device visible")
    torch.backends.cudnn.benchmark = True
    print(
        f"device: {device_name()} | torch {torch.__version__} | precision {args.precision} | "
        f"model {args.model} | batch {args.batch_size} | PGD-10 | CIFAR-shaped synthetic data"
    )
    samples = int(args.batch_size * args.batches / 0.72) + 1  # 20 % test, 10 % of the rest validation
    dm = RobustDataModule(
        "synthetic",
        batch_size=args.batch_size,
        synthetic_samples=samples,
        synthetic_image_size=32,
        synthetic_classes=10,
        num_workers=2,
    )
    common = dict(
        model=args.model,
        num_classes=10,
        in_channels=3,
        threat=ThreatModel(eps=8 / 255, step_size=2 / 255, steps=10),
        channels_last=args.channels_last,
    )
    work = Path(tempfile.mkdtemp(prefix="s2ap_gpu_smoke_"))

    def run(name: str, module: L.LightningModule) -> Path:
        timer = StepTimer(skip=3)
        trainer = bench_trainer(
            [timer],
            accelerator=args.accelerator,
            precision=args.precision,
            limit_val_batches=2,
            num_sanity_val_steps=2,
            default_root_dir=work,
        )
        trainer.fit(module, datamodule=dm)
        path = work / f"{name}.ckpt"
        trainer.save_checkpoint(path)
        robust = float(trainer.callback_metrics.get("val/robust_acc", float("nan")))
        print(
            f"{name:9s}: {timer.images_per_second:8.0f} images/s  (median step {timer.median * 1e3:6.1f} ms, "
            f"{len(timer.times)} timed steps; val robust acc {robust:.3f})",
            flush=True,
        )
        return path

    pre = run("pretrain", RobustPretrainer(**common))
    hydra = run("hydra", ScoreSpaceSAMPruner(sparsity=0.9, gamma=0.0, init_from=str(pre), **common))
    s2ap = run(
        "s2ap", ScoreSpaceSAMPruner(sparsity=0.9, gamma=0.01, warmup_epochs=0, init_from=str(pre), **common)
    )
    run("finetune", MaskedFinetuner(init_from=str(s2ap), **common))
    print(f"checkpoints: {hydra.parent}")


if __name__ == "__main__":
    main()
