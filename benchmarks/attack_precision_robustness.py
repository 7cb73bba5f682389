"""Does training with bf16 attacks (``attack_precision: training``) cost robustness? A paired check.

Per seed, the study's robust pretraining cell twice under ``bf16-mixed``: once with the training
attacks in fp32 (the default), once at the training precision. Both models are evaluated by the
evaluation protocol, in fp32 (clean, PGD, AutoAttack on a seeded class-stratified sample). The
paired difference per seed is what to read; the cells are resumable (``s2ap study`` cell files).

Run:  python benchmarks/attack_precision_robustness.py                  # digits, 3 seeds, CPU
      python benchmarks/attack_precision_robustness.py --data-config configs/data/mnist_5k.yaml
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s2ap_lightning.jobs.study import Cell, StudySpec, run_cell  # noqa: E402
from s2ap_lightning.quiet import silence_known_noise  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-config", default="configs/data/digits.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--aa-images", type=int, default=100)
    parser.add_argument("--out", default="results/attack_precision")
    args = parser.parse_args()
    silence_known_noise()
    rows = {}
    for attack_precision in ("fp32", "training"):
        spec = StudySpec(
            name=f"attack_precision_{attack_precision}",
            data_config=args.data_config,
            out=f"{args.out}/{attack_precision}",
            seeds=args.seeds,
            pretrain_epochs=args.epochs,
            precision=args.precision,
            attack_precision=attack_precision,
            accelerator=args.accelerator,
            aa_images=args.aa_images,
        )
        for seed in args.seeds:
            start = time.perf_counter()
            result = run_cell(spec, Cell("pretrain", seed))
            rows[attack_precision, seed] = result
            print(
                f"attack_precision={attack_precision} seed {seed}: clean {result['clean_acc']:.4f} "
                f"PGD {result['pgd_acc']:.4f} AA {result['aa_acc']} checks "
                f"{'passed' if result['checks_passed'] else result['check_failures']} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    print(f"\n{args.data_config}, {args.epochs} epochs, {args.precision}; figures in % of test images")
    print("| seed | clean fp32 / training | PGD fp32 / training | AutoAttack fp32 / training |")
    print("|---|---|---|---|")
    diffs: dict[str, list[float]] = {"clean_acc": [], "pgd_acc": [], "aa_acc": []}
    for seed in args.seeds:
        a, b = rows["fp32", seed], rows["training", seed]
        cells = []
        for key in diffs:
            if a[key] is not None and b[key] is not None:
                diffs[key].append(100 * (b[key] - a[key]))
                cells.append(f"{100 * a[key]:.1f} / {100 * b[key]:.1f}")
            else:
                cells.append("-")
        print(f"| {seed} | " + " | ".join(cells) + " |")
    summary = []
    for key, values in diffs.items():
        if values:
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            summary.append(f"{key} {statistics.mean(values):+.1f} (sd {sd:.1f})")
    print("training minus fp32, mean over seeds, points: " + ", ".join(summary))


if __name__ == "__main__":
    main()
