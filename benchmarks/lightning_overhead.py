"""What the Lightning stage costs over a plain PyTorch loop doing the same mask-search math.

The HYDRA step and the S2AP step, each run two ways on the same data, initial weights and seeds:

* **Lightning**: ``ScoreSpaceSAMPruner`` under a ``Trainer`` (its loop, hooks, logging, metrics);
* **plain**: a hand-written loop over the project's own parts only: the base method's masks and
  effective weights, the robust loss's attack and loss, the score perturbation and SGD.

The two are alternated over rounds (host load drifts), and the time of the steps after the first
``--warmup`` is taken end to end (data loading included). After each pair the two final score sets
are compared: a zero difference shows the plain loop did exactly the Lightning step's work. Host
timing noise on small shared machines is several per cent per run, so the time Lightning spends
outside ``training_step`` (its loop, hooks, data fetching) is reported too: it does not depend on
comparing two noisy runs.

Run:  python benchmarks/lightning_overhead.py                          # small CNN and ResNet-18, CPU
      python benchmarks/lightning_overhead.py --models small_cnn --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import ThroughputTimer, bench_trainer, device_name, sync  # noqa: E402

from s2ap_lightning.attacks import ThreatModel  # noqa: E402
from s2ap_lightning.models.batchnorm import frozen_bn_statistics  # noqa: E402
from s2ap_lightning.pruning.perturbation import perturbed, score_perturbation  # noqa: E402
from s2ap_lightning.pruning.scores import masked_forward  # noqa: E402
from s2ap_lightning.stages import ScoreSpaceSAMPruner  # noqa: E402

#: (image side, batch size) per model: sizes a 2-core CPU runs in seconds per step.
SIZES = {"small_cnn": (32, 64), "resnet18": (32, 16)}


def make_pruner(model: str, gamma: float) -> ScoreSpaceSAMPruner:
    torch.manual_seed(0)
    return ScoreSpaceSAMPruner(
        model=model,
        num_classes=10,
        in_channels=3,
        image_size=SIZES[model][0],
        sparsity=0.9,
        gamma=gamma,
        warmup_epochs=0,
        threat=ThreatModel(eps=8 / 255, step_size=2 / 255, steps=10),
    )


def make_loader(model: str, batches: int) -> DataLoader:
    side, batch_size = SIZES[model]
    g = torch.Generator().manual_seed(0)
    n = batch_size * batches
    data = TensorDataset(torch.rand(n, 3, side, side, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def run_lightning(model: str, gamma: float, args: argparse.Namespace) -> tuple[float, dict, float]:
    """Seconds per step, final scores, and seconds per step spent outside ``training_step``."""
    pruner = make_pruner(model, gamma)
    timer = ThroughputTimer(skip=args.warmup)
    inside: list[float] = []
    step = pruner.training_step

    def timed_step(batch, batch_idx):
        t = time.perf_counter()
        out = step(batch, batch_idx)
        if batch_idx >= args.warmup:
            inside.append(time.perf_counter() - t)
        return out

    pruner.training_step = timed_step
    trainer = bench_trainer([timer], log_every_n_steps=args.log_every_n_steps)
    torch.manual_seed(1)  # the attacks' random starts
    trainer.fit(pruner, train_dataloaders=make_loader(model, args.warmup + args.steps))
    outside = timer.seconds_per_step - sum(inside) / len(inside)
    return timer.seconds_per_step, {n: s.detach().clone() for n, s in pruner.method.items()}, outside


def run_plain(model: str, gamma: float, args: argparse.Namespace) -> tuple[float, dict, float]:
    """The same step as ``ScoreSpaceSAMPruner.training_step``, without Lightning."""
    pruner = make_pruner(model, gamma)
    net, scores, loss_fn, attack = pruner.model, pruner.method, pruner.robust_loss, pruner.threat
    params = [p for p in pruner.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=pruner.hparams.lr, momentum=0.9, weight_decay=pruner.hparams.weight_decay
    )
    pruner.train()

    def loss_at(masks, x, x_adv, y):
        weights = scores.effective_weights(net, masks, differentiable=True)
        return loss_fn(lambda inp: masked_forward(net, weights, inp), x, x_adv, y).loss

    torch.manual_seed(1)
    start = None
    for i, (x, y) in enumerate(make_loader(model, args.warmup + args.steps)):
        if i == args.warmup:
            sync()
            start = time.perf_counter()
        masks = scores.masks()
        frozen = scores.effective_weights(net, masks, differentiable=False)
        x_adv = loss_fn.adversarial(lambda inp: masked_forward(net, frozen, inp), x, y, attack, net)
        opt.zero_grad()
        if gamma == 0:
            loss_at(masks, x, x_adv, y).backward()
        else:
            s = dict(scores.items())
            loss_at(masks, x, x_adv, y).backward()
            z = score_perturbation(s, {n: p.grad.detach().clone() for n, p in s.items()}, gamma)
            opt.zero_grad()
            with perturbed(s, z), frozen_bn_statistics(net):
                loss_at(scores.masks(), x, x_adv, y).backward()
        opt.step()
        scores.after_optimizer_step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    return seconds, {n: s.detach().clone() for n, s in scores.items()}, 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["small_cnn", "resnet18"], choices=sorted(SIZES))
    parser.add_argument("--rounds", type=int, default=3, help="alternating Lightning/plain rounds")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument(
        "--log-every-n-steps", type=int, default=50, help="the Trainer's (50 is Lightning's default)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"device: {device_name()} | torch {torch.__version__} | lightning {L.__version__} | PGD-10 | "
        f"{args.rounds} rounds x {args.steps} timed steps | log_every_n_steps {args.log_every_n_steps}",
        flush=True,
    )
    rows = []
    for model in args.models:
        for method, gamma in (("HYDRA", 0.0), ("S2AP", 0.01)):
            light, plain, diffs, outside = [], [], [], []
            for r in range(-1, args.rounds):  # round -1 warms the process up and is not counted
                order = (run_lightning, run_plain) if r % 2 == 0 else (run_plain, run_lightning)
                results = {fn.__name__: fn(model, gamma, args) for fn in order}
                (t_l, s_l, o_l), (t_p, s_p, _) = results["run_lightning"], results["run_plain"]
                if r < 0:
                    continue
                light.append(t_l)
                outside.append(o_l)
                plain.append(t_p)
                diffs.append(max(float((s_l[n] - s_p[n]).abs().max()) for n in s_l))
                print(
                    f"  {model} {method} round {r + 1}: Lightning {t_l:.3f} s, plain {t_p:.3f} s", flush=True
                )
            ml, mp = statistics.median(light), statistics.median(plain)
            # Paired per round (the two ran back to back), so slow drifts of the host cancel.
            ratios = sorted(a / b for a, b in zip(light, plain, strict=True))
            side, bs = SIZES[model]
            rows.append(
                f"| {model} {side}x{side}, batch {bs} | {method} | {ml * 1e3:.0f} ms | {mp * 1e3:.0f} ms | "
                f"**{statistics.median(ratios):.3f}** ({ratios[0]:.2f}-{ratios[-1]:.2f}) | "
                f"{statistics.median(outside) * 1e3:.1f} ms | {max(diffs):.1e} |"
            )
    print(
        "| model | step | Lightning (median) | plain loop (median) | Lightning / plain, median of rounds "
        "(range) | Lightning outside training_step | max score diff |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
