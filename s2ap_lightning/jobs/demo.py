"""The Quickstart job: the whole pipeline on scikit-learn's digits, HYDRA against S2AP.

One robust pretraining, then for every sparsity a HYDRA and an S2AP mask search from that same
pretrained model, finetuning of each, and an evaluation of the exported pruned models (clean,
PGD-20, AutoAttack standard on a fixed test subset). Writes ``results.csv`` and prints a table.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from s2ap_lightning.analysis.report import RESULTS_COLUMNS as COLUMNS
from s2ap_lightning.analysis.report import write_report
from s2ap_lightning.analysis.sharpness import score_space_sharpness
from s2ap_lightning.attacks.pgd import AttackConfig
from s2ap_lightning.checkpoint import atomic_torch_save, load_file
from s2ap_lightning.data import RobustDataModule, split_tensors
from s2ap_lightning.evaluation import EvalProtocol, evaluate, pgd_accuracy
from s2ap_lightning.export import format_sparsity, plain_model, pruned_state_dict, sparsity_table
from s2ap_lightning.jobs.common import record_figures, stage_trainer
from s2ap_lightning.stages import MaskedFinetuner, RobustPretrainer, ScoreSpaceSAMPruner
from s2ap_lightning.stages.callbacks import MaskStabilityCallback


@dataclass
class DemoConfig:
    """Settings of the demo; the defaults finish in a few minutes on a 2-core CPU.

    Args:
        out: output folder (results.csv, report.md, one folder per run).
        model: architecture (``mlp``: every layer large enough to keep 1 % of it).
        seed: seed of every stage and of the evaluation's AutoAttack sample.
        sparsities: pruned fractions (0.9 keeps 10 % of every layer).
        gamma: S2AP's relative score-space radius.
        pretrain_epochs: epochs of robust pretraining.
        prune_epochs: epochs of each mask search.
        warmup_epochs: plain HYDRA epochs before S2AP starts.
        finetune_epochs: epochs of finetuning, the same for both methods.
        eps: L-inf budget on [0, 1] pixels.
        step_size: PGD step size.
        pgd_steps: PGD steps of the test evaluation.
        aa_images: test images attacked by AutoAttack (class-stratified, seeded).
        progress: progress bars inside stages.
        overwrite: write into an ``out`` that already holds files (a previous demo's checkpoints,
            results.csv and report.md are replaced); by default such a folder is refused.

    """

    out: str = "runs/demo"
    model: str = "mlp"
    seed: int = 0
    sparsities: list[float] = field(default_factory=lambda: [0.9, 0.99])
    gamma: float = 0.01
    pretrain_epochs: int = 20
    prune_epochs: int = 10
    warmup_epochs: int = 2
    finetune_epochs: int = 8
    eps: float = 0.1
    step_size: float = 0.025
    pgd_steps: int = 20
    aa_images: int = 100
    progress: bool = True
    overwrite: bool = False


def run_demo(cfg: DemoConfig) -> list[dict[str, Any]]:
    """Run the pipeline and return one row per (method, sparsity)."""
    out = Path(cfg.out)
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not cfg.overwrite:
        # The stages' checkpoint folders have fixed names: a second demo here would replace them.
        raise FileExistsError(
            f"out={str(out)!r} already holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''}; "
            "choose another --out or pass --overwrite true to replace a previous demo's results"
        )
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    common = dict(
        model=cfg.model,
        num_classes=10,
        in_channels=1,
        image_size=8,
        eps=cfg.eps,
        step_size=cfg.step_size,
        attack_steps=10,
    )
    dm = RobustDataModule("digits", batch_size=128)
    dm.setup()
    x_test, y_test = split_tensors(dm.test_set)
    x_val, y_val = split_tensors(dm.val_set, 256)
    runs = [(m, s) for s in cfg.sparsities for m in ("hydra", "s2ap")]
    total = 1 + 2 * len(runs)
    started = time.time()

    def stage(i: int, text: str) -> None:
        print(f"\n[{i}/{total}] {text}  (elapsed {time.time() - started:.0f} s)", flush=True)

    stage(1, f"robust pretraining (PGD-AT, eps {cfg.eps}), {cfg.pretrain_epochs} epochs")
    L.seed_everything(cfg.seed, verbose=False)
    pre_dir = out / "pretrain"
    stage_trainer(pre_dir, cfg.pretrain_epochs, cfg.progress).fit(
        RobustPretrainer(lr=0.1, **common), datamodule=dm
    )
    pretrained = str(pre_dir / "best.ckpt")
    protocol = EvalProtocol(
        cfg.eps, cfg.step_size, pgd_steps=cfg.pgd_steps, aa_images=cfg.aa_images, subset_seed=cfg.seed
    )
    dense = evaluate(plain_model(load_file(pretrained)).eval(), x_test, y_test, protocol)
    rows = [
        {
            "method": "dense",
            "sparsity": 0.0,
            "seed": cfg.seed,
            "gamma": None,
            **record_figures(dense),
            "mask_pgd_acc": None,
            "mask_hamming_last_epoch": None,
            "lambda_max": None,
            "sharpness": None,
            "global_sparsity": 0.0,
        }
    ]
    for k, (method, sparsity) in enumerate(runs):
        gamma = cfg.gamma if method == "s2ap" else 0.0
        tag = f"{method}_sp{sparsity:g}"
        stage(
            2 + 2 * k, f"mask search {method} (gamma {gamma}), sparsity {sparsity}, {cfg.prune_epochs} epochs"
        )
        L.seed_everything(cfg.seed, verbose=False)
        stability = MaskStabilityCallback(dirpath=str(out / tag / "masks"))
        pruner = ScoreSpaceSAMPruner(
            sparsity=sparsity, gamma=gamma, warmup_epochs=cfg.warmup_epochs, init_from=pretrained, **common
        )
        stage_trainer(out / tag / "prune", cfg.prune_epochs, cfg.progress, [stability]).fit(
            pruner, datamodule=dm
        )
        prune_ckpt = out / tag / "prune" / "best.ckpt"

        # Score-space sharpness of the searched scores, on a fixed validation subset.
        sharp = score_space_sharpness(
            pruner.eval().objective(), x_val, y_val, gamma=cfg.gamma or 0.01, max_iter=20, seed=cfg.seed
        )

        # Mask robust accuracy: the pretrained weights under the searched mask, before finetuning.
        masked_model, _ = pruned_state_dict(load_file(prune_ckpt))
        mask_pgd = pgd_accuracy(
            masked_model.eval(),
            x_test,
            y_test,
            AttackConfig(cfg.eps, cfg.step_size, cfg.pgd_steps),
        )

        stage(3 + 2 * k, f"finetuning {method}, sparsity {sparsity}, {cfg.finetune_epochs} epochs")
        L.seed_everything(cfg.seed, verbose=False)
        finetuner = MaskedFinetuner(init_from=str(prune_ckpt), lr=0.01, **common)
        stage_trainer(out / tag / "finetune", cfg.finetune_epochs, cfg.progress).fit(finetuner, datamodule=dm)

        model, state = pruned_state_dict(load_file(out / tag / "finetune" / "best.ckpt"))
        atomic_torch_save(state, out / tag / "pruned_model.pt")
        rows_sp, global_sp = sparsity_table(model)
        (out / tag / "sparsity.txt").write_text(format_sparsity(rows_sp, global_sp) + "\n")
        report = evaluate(model, x_test, y_test, protocol)
        for failure in report.failures():
            print(f"EVALUATION CHECK FAILED ({tag}): {failure}")
        rows.append(
            {
                "method": method,
                "sparsity": sparsity,
                "seed": cfg.seed,
                "gamma": gamma,
                **record_figures(report),
                "mask_pgd_acc": mask_pgd,
                "mask_hamming_last_epoch": stability.history[-1]["hamming"],
                "lambda_max": sharp.lambda_max,
                "sharpness": sharp.sharpness,
                "global_sparsity": global_sp,
            }
        )
    write_results(rows, out / "results.csv")
    report = write_report(out)
    print(f"\nfinished in {time.time() - started:.0f} s\n")
    print(format_table(rows))
    print(
        f"\nPGD-{cfg.pgd_steps} and clean accuracy on all {len(x_test)} test images; AutoAttack "
        f"standard on a class-stratified sample of {min(cfg.aa_images, len(x_test))} (seed {cfg.seed}); "
        f"gradient-masking checks on the same images. Results: {out / 'results.csv'}; "
        f"report with plots: {report}"
    )

    return rows


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")  # the CSV's columns only

        writer.writeheader()
        writer.writerows(rows)


def _num(value: Any, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{'-':>{width}}" if value is None else format(value, ">" + spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'method':<7} {'sparsity':>8} {'clean':>7} {'PGD':>7} {'AA':>7} {'mask PGD':>9} {'hamming':>8} "
        f"{'lambda_max':>10} {'checks':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        aa = "n/a" if r["aa_acc"] is None else f"{r['aa_acc']:.3f}"
        lines.append(
            f"{r['method']:<7} {r['sparsity']:>8g} {r['clean_acc']:>7.3f} {r['pgd_acc']:>7.3f} {aa:>7} "
            f"{_num(r['mask_pgd_acc'], '9.3f')} {_num(r['mask_hamming_last_epoch'], '8.4f')} "
            f"{_num(r['lambda_max'], '10.4g')} "
            f"{'ok' if r.get('checks_passed', True) else 'FAILED':>7}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``s2ap demo``: every field of :class:`DemoConfig` is a flag (``--help``) and a ``--config`` key."""
    from jsonargparse import ActionConfigFile, ArgumentParser  # imported when the command runs

    parser = ArgumentParser(prog="s2ap demo", description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of the settings below")
    parser.add_class_arguments(DemoConfig, as_group=False)
    cfg = parser.parse_args(argv)
    fields = DemoConfig.__dataclass_fields__
    run_demo(DemoConfig(**{k: v for k, v in cfg.as_dict().items() if k in fields}))
    return 0
