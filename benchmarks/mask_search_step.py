"""Median time per mask-search optimiser step: HYDRA against S2AP, same model, data and attack.

Run:  python benchmarks/mask_search_step.py                       # ResNet-18, batch 128, PGD-10
      python benchmarks/mask_search_step.py --model small_cnn --image-size 8 --batch-size 128  # CPU

The step includes the attack (PGD-10 on the masked model), the robust loss and the optimiser step.
The mask computations per step are counted by the score container itself.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import StepTimer, bench_trainer, device_name  # noqa: E402

from s2ap_lightning.attacks import ThreatModel  # noqa: E402
from s2ap_lightning.stages import ScoreSpaceSAMPruner  # noqa: E402


def measure(gamma: float, args: argparse.Namespace) -> StepTimer:
    torch.manual_seed(0)
    n = args.batch_size * (args.steps + args.warmup)
    x = torch.rand(n, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (n,))
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, pin_memory=torch.cuda.is_available())
    pruner = ScoreSpaceSAMPruner(
        model=args.model,
        num_classes=10,
        in_channels=3,
        sparsity=0.9,
        gamma=gamma,
        warmup_epochs=0,
        threat=ThreatModel(eps=8 / 255, step_size=2 / 255, steps=args.attack_steps),
    )
    timer = StepTimer(skip=args.warmup)
    trainer = bench_trainer([timer], accelerator="auto", precision=args.precision)
    trainer.fit(pruner, train_dataloaders=loader)
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--rounds", type=int, default=3, help="alternating HYDRA/S2AP measurement rounds")
    args = parser.parse_args()
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    print(
        f"device: {device_name()} | model {args.model} | batch {args.batch_size} | "
        f"{args.image_size}x{args.image_size} | PGD-{args.attack_steps} | precision {args.precision} | "
        f"torch {torch.__version__}"
    )
    # Alternate the methods over several rounds: GPU clocks and host jitter drift over minutes, and a
    # single back-to-back measurement gave ratios from 1.11 to 1.26 for the same code.
    times: dict[str, list[float]] = {"hydra": [], "s2ap": []}
    masks: dict[str, set[int]] = {"hydra": set(), "s2ap": set()}
    for _ in range(args.rounds):
        for name, gamma in (("hydra", 0.0), ("s2ap", 0.01)):
            timer = measure(gamma, args)
            times[name] += timer.times
            masks[name] |= set(timer.masks)
    results = {}
    for name in ("hydra", "s2ap"):
        median = statistics.median(times[name])
        per_step = sorted(masks[name])
        results[name] = median
        print(
            f"{name:5s}: median step {median * 1000:8.1f} ms over {len(times[name])} steps "
            f"({args.rounds} rounds), {args.batch_size / median:8.1f} images/s, mask computations per step: "
            f"{per_step[0] if len(per_step) == 1 else per_step}"
        )
    print(f"s2ap/hydra step time ratio: {results['s2ap'] / results['hydra']:.2f}")


if __name__ == "__main__":
    main()
