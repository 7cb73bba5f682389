"""Where an S2AP step spends its time: attack, pass 1, perturbation, pass 2, optimiser step.

Run:  python benchmarks/profile_s2ap_step.py --precision bf16-mixed
Each phase is timed with device synchronisation around it (this slows the step a little; use
mask_search_step.py for the headline figures).
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import StepTimer, bench_trainer, device_name, sync  # noqa: E402

import s2ap_lightning.stages.prune as prune_mod  # noqa: E402
from s2ap_lightning.attacks import ThreatModel  # noqa: E402
from s2ap_lightning.stages import ScoreSpaceSAMPruner  # noqa: E402


def timed(store, name, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        import time

        sync()
        t = time.perf_counter()
        out = fn(*a, **k)
        sync()
        store[name].append(time.perf_counter() - t)
        return out

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--gamma", type=float, default=0.01)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    n = args.batch_size * args.steps
    loader = DataLoader(
        TensorDataset(torch.rand(n, 3, args.image_size, args.image_size), torch.randint(0, 10, (n,))),
        batch_size=args.batch_size,
    )
    pruner = ScoreSpaceSAMPruner(
        model=args.model,
        num_classes=10,
        in_channels=3,
        gamma=args.gamma,
        warmup_epochs=0,
        threat=ThreatModel(eps=8 / 255, step_size=2 / 255),
    )
    store: dict[str, list[float]] = collections.defaultdict(list)
    pruner._adversarial = timed(store, "attack", pruner._adversarial)
    pruner._loss = timed(store, "loss forward", pruner._loss)
    pruner.manual_backward = timed(store, "backward", pruner.manual_backward)
    pruner.method.masks = timed(store, "mask (top-k)", pruner.method.masks)
    prune_mod.score_perturbation = timed(store, "perturbation z", prune_mod.score_perturbation)
    step_timer = StepTimer(skip=2)
    trainer = bench_trainer([step_timer], accelerator="auto", precision=args.precision)
    trainer.fit(pruner, train_dataloaders=loader)
    print(
        f"device: {device_name()} | {args.model} | batch {args.batch_size} | {args.precision} | "
        f"gamma {args.gamma}"
    )
    accounted = 0.0
    for name, values in store.items():
        per_step = len(values) / args.steps
        median = statistics.median(values[2:])
        accounted += median * per_step
        print(f"{name:15s} median {median * 1e3:7.2f} ms x {per_step:.0f} per step")
    total = step_timer.median
    print(
        f"{'whole step':15s} median {total * 1e3:7.2f} ms; not in the phases above: "
        f"{(total - accounted) * 1e3:.2f} ms (optimiser step, logging, copies)"
    )


if __name__ == "__main__":
    main()
