"""Images per second of every stage under the speed options, and the S2AP/HYDRA step-time ratio.

A matrix of Lightning runs on CIFAR-shaped synthetic data (ResNet-18, PGD-10, 32x32): each stage
(robust pretraining, HYDRA search, S2AP search, masked finetuning) at each batch size, with the
training attacks in fp32 or at the training precision (``attack_precision``), eager or compiled
(``compile``). Then HYDRA and S2AP alternated over rounds in true fp32 and in ``bf16-mixed`` for the
step-time ratio. Runs go in priority order under a deadline, so a short device lease returns the
most important figures; every finished run is appended to a JSON-lines file at once.

Throughput counts the timed steps end to end (Lightning's loop, data loading and hooks included):
device synchronised once before the first timed step and once after the last. The first steps are
excluded: they include cuDNN autotuning and, with ``compile``, the compilation (reported apart).

Run:  python benchmarks/gpu_throughput.py --out results.jsonl          # one GPU, about 8 minutes
      python benchmarks/gpu_throughput.py --accelerator cpu --model small_cnn --image-size 8 \
          --batch-sizes 32 --steps 2 --ratio-rounds 1                   # a dry run of the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import ThroughputTimer, bench_trainer, device_name  # noqa: E402

from s2ap_lightning.attacks import ThreatModel  # noqa: E402
from s2ap_lightning.stages import MaskedFinetuner, RobustPretrainer, ScoreSpaceSAMPruner  # noqa: E402

STAGES = ("pretrain", "hydra", "s2ap", "finetune")
#: The three settings every stage is measured in first; ``compiled`` alone comes last.
MAIN = ("eager", "eager+lowp_attack", "compiled+lowp_attack")
#: name -> (attack_precision, compile, channels_last); "lowp_attack": attacks at the training precision
VARIANTS = {
    "eager": ("fp32", False, False),
    "eager+lowp_attack": ("training", False, False),
    "compiled+lowp_attack": ("training", True, False),
    "compiled": ("fp32", True, False),
    "eager+lowp_attack+channels_last": ("training", False, True),
    "compiled+lowp_attack+channels_last": ("training", True, True),
}


@dataclass
class Run:
    """One measured (or skipped) configuration."""

    kind: str  # "stage" or "ratio"
    stage: str
    batch_size: int
    precision: str
    variant: str
    images_per_second: float | None = None
    step_ms: float | None = None
    warmup_s: float | None = None
    timed_steps: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)


def build(stage: str, args: argparse.Namespace, variant: str) -> L.LightningModule:
    attack_precision, compile, channels_last = VARIANTS[variant]
    common = dict(
        model=args.model,
        num_classes=10,
        in_channels=3,
        image_size=args.image_size,
        threat=ThreatModel(eps=8 / 255, step_size=2 / 255, steps=10),
        channels_last=channels_last,
        attack_precision=attack_precision,
        compile=compile,
    )
    if stage == "pretrain":
        return RobustPretrainer(**common)
    if stage == "finetune":
        return MaskedFinetuner(**common)  # the mask's values do not change the work per step
    gamma = 0.0 if stage == "hydra" else 0.01
    return ScoreSpaceSAMPruner(sparsity=0.9, gamma=gamma, warmup_epochs=0, **common)


def loader(args: argparse.Namespace, batch_size: int, batches: int) -> DataLoader:
    """Whole batches straight from one tensor (one index per batch), pinned for the copy to the GPU."""
    n = batch_size * batches
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.rand(n, 3, args.image_size, args.image_size, generator=g),
        torch.randint(0, 10, (n,), generator=g),
    )
    sampler = BatchSampler(RandomSampler(data, generator=g), batch_size, drop_last=True)
    return DataLoader(data, sampler=sampler, batch_size=None, pin_memory=args.accelerator == "gpu")


def measure(
    stage: str, args: argparse.Namespace, batch_size: int, precision: str, variant: str, steps: int
) -> tuple[Run, ThroughputTimer]:
    torch.manual_seed(0)
    module = build(stage, args, variant)
    timer = ThroughputTimer(skip=args.warmup)
    trainer = bench_trainer(
        [timer], accelerator=args.accelerator, precision=precision, benchmark=args.accelerator == "gpu"
    )
    trainer.fit(module, train_dataloaders=loader(args, batch_size, args.warmup + steps))
    run = Run(
        "stage",
        stage,
        batch_size,
        precision,
        variant,
        images_per_second=timer.images_per_second,
        step_ms=timer.seconds_per_step * 1e3,
        warmup_s=timer.warmup_seconds,
        timed_steps=timer.steps,
    )
    if module.hparams.compile and not module.forward_fn.compiled:
        run.note = f"compile fell back to eager: {module.forward_fn.fallback_reason}"
    return run, timer


def plan(args: argparse.Namespace) -> list[tuple[str, str, int, str, str]]:
    """(kind, stage, batch size, precision, variant) in priority order: what matters most runs first."""
    big, *rest = sorted(args.batch_sizes, reverse=True)
    low = args.precision
    runs: list[tuple[str, str, int, str, str]] = []
    # 1. Adversarial training at the largest batch (today's setting, low-precision attacks, compiled),
    # 2. then the other stages likewise.
    for stage in STAGES:
        runs += [("stage", stage, big, low, v) for v in MAIN]
    # 2b. Channels-last memory format with the faster settings (adversarial training only).
    runs += [("stage", "pretrain", big, low, v + "+channels_last") for v in MAIN[1:]]
    # 3. The S2AP/HYDRA ratio, alternated: true fp32 at each batch size, then the fastest setting.
    for bs in sorted(args.batch_sizes):
        runs += [("ratio", "", bs, "32-true", "eager")]
    runs += [("ratio", "", big, low, "compiled+lowp_attack")]
    # 4. The smaller batch sizes.
    for bs in rest:
        for stage in STAGES:
            runs += [("stage", stage, bs, low, v) for v in MAIN]
    # 5. Compile alone (fp32 attacks).
    for bs in sorted(args.batch_sizes, reverse=True):
        runs += [("stage", stage, bs, low, "compiled") for stage in STAGES]
    return runs


def ratio(args: argparse.Namespace, batch_size: int, precision: str, variant: str) -> Run:
    """Median step time of S2AP over HYDRA's, the two alternated over rounds (clocks drift)."""
    times: dict[str, list[float]] = {"hydra": [], "s2ap": []}
    for _ in range(args.ratio_rounds):
        for stage in ("hydra", "s2ap"):
            _, timer = measure(stage, args, batch_size, precision, variant, args.ratio_steps)
            times[stage].append(timer.seconds_per_step)
    hydra, s2ap = statistics.median(times["hydra"]), statistics.median(times["s2ap"])
    return Run(
        "ratio",
        "s2ap/hydra",
        batch_size,
        precision,
        variant,
        step_ms=s2ap * 1e3,
        timed_steps=args.ratio_rounds * args.ratio_steps,
        extra={"ratio": s2ap / hydra, "hydra_step_ms": hydra * 1e3, "s2ap_step_ms": s2ap * 1e3},
    )


def table(runs: list[Run]) -> str:
    lines = ["| stage | batch | precision | variant | images/s | step ms | first steps s | note |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in runs:
        if r.kind == "ratio" and "ratio" in r.extra:
            lines.append(
                f"| S2AP/HYDRA step ratio **{r.extra['ratio']:.2f}** | {r.batch_size} | {r.precision} | "
                f"{r.variant} | | HYDRA {r.extra['hydra_step_ms']:.1f}, "
                f"S2AP {r.extra['s2ap_step_ms']:.1f} | | {r.note} |"
            )
        elif r.images_per_second is not None:
            lines.append(
                f"| {r.stage} | {r.batch_size} | {r.precision} | {r.variant} | {r.images_per_second:.0f} | "
                f"{r.step_ms:.1f} | {r.warmup_s:.1f} | {r.note} |"
            )
        else:
            lines.append(
                f"| {r.stage or 'ratio'} | {r.batch_size} | {r.precision} | {r.variant} | | | | {r.note} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 128])
    parser.add_argument("--precision", default="bf16-mixed", help="training precision of the stage runs")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per stage run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (autotuning, compiling)")
    parser.add_argument("--ratio-rounds", type=int, default=2)
    parser.add_argument("--ratio-steps", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds; no run starts after it")
    parser.add_argument("--accelerator", default="gpu", help="cpu: a dry run of this script")
    parser.add_argument("--out", type=Path, default=Path("gpu_throughput.jsonl"))
    args = parser.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        sys.exit("gpu_throughput: no CUDA device visible")
    # Many short runs of differently shaped graphs in one process: keep every compiled graph
    # (the default limit would silently drop to eager), and compile each batch size statically.
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.automatic_dynamic_shapes = False
    start = time.perf_counter()
    header = (
        f"device: {device_name()} | torch {torch.__version__} | lightning {L.__version__} | "
        f"model {args.model} | {args.image_size}x{args.image_size} | PGD-10 | synthetic data"
    )
    print(header, flush=True)
    runs: list[Run] = []
    for kind, stage, bs, precision, variant in plan(args):
        if time.perf_counter() - start > args.deadline:
            runs.append(Run(kind, stage, bs, precision, variant, note="not run: deadline"))
            continue
        try:
            if kind == "ratio":
                run = ratio(args, bs, precision, variant)
            else:
                run, _ = measure(stage, args, bs, precision, variant, args.steps)
        except Exception as err:  # noqa: BLE001 - one failed configuration must not lose the others
            run = Run(kind, stage, bs, precision, variant, note=f"failed: {type(err).__name__}: {err}"[:300])
        runs.append(run)
        with args.out.open("a") as f:
            f.write(json.dumps({"device": device_name(), "torch": torch.__version__, **asdict(run)}) + "\n")
        print(f"[{time.perf_counter() - start:6.0f} s] {json.dumps(asdict(run))}", flush=True)
    print(header)
    print(table(runs))


if __name__ == "__main__":
    main()
