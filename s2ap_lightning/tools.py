"""The analysis tools of ``s2ap`` (hamming, sharpness, landscape, security, report, pick): the CLI layer.

Each reads checkpoints with ``weights_only=True`` and uses a fixed subset of a split (validation by
default) of the dataset the checkpoint was trained on, unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from s2ap_lightning.checkpoint import load_file, refuse_existing


def _fixed_subset(checkpoint: dict, args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    import inspect

    from s2ap_lightning.data import RobustDataModule

    # Only the DataModule's own arguments (LightningCLI stores extra keys such as `_instantiator`).
    accepted = set(inspect.signature(RobustDataModule.__init__).parameters) - {"self"}
    stored = checkpoint.get("datamodule_hyper_parameters") or {}
    data_hp = {k: v for k, v in stored.items() if k in accepted}

    if args.dataset:
        data_hp["dataset"] = args.dataset
    if args.data_dir:
        data_hp["data_dir"] = args.data_dir
    data_hp.pop("test_subset", None)
    dm = RobustDataModule(**data_hp)
    dm.setup()
    split = dm.val_set if args.split == "val" else dm.test_set
    n = min(args.images, len(split))
    xs, ys = zip(*[split[i] for i in range(n)], strict=True)
    return torch.stack(xs), torch.as_tensor(ys)


def _pruner(path: str) -> tuple[Any, dict]:
    from s2ap_lightning.stages import ScoreSpaceSAMPruner

    checkpoint = load_file(path)
    if not any(k.startswith("scores.") for k in checkpoint.get("state_dict", {})):
        raise SystemExit(f"{path}: not a mask-search checkpoint (no scores); pass a prune-stage checkpoint")
    module = ScoreSpaceSAMPruner.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    return module.eval(), checkpoint


def _data_args(parser: argparse.ArgumentParser, images: int = 256) -> None:
    parser.add_argument("--images", type=int, default=images, help="size of the fixed subset")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--dataset", default=None, help="override the checkpoint's dataset")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)


def hamming_command(argv: list[str]) -> int:
    from s2ap_lightning.analysis.stability import hamming, load_masks

    parser = argparse.ArgumentParser(
        prog="s2ap hamming",
        description=(
            "Normalised Hamming distance between two masks (e.g. the final masks of two seeds). Each file "
            "is a stage checkpoint, an exported pruned state dict, or a packed mask file."
        ),
    )
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--per-layer", action="store_true")
    args = parser.parse_args(argv)
    distance, per_layer = hamming(load_masks(args.a), load_masks(args.b))
    if args.per_layer:
        for name, value in per_layer.items():
            print(f"{name:40s} {value:.6f}")
    print(f"hamming (normalised): {distance:.6f}")
    return 0


def sharpness_command(argv: list[str]) -> int:
    from s2ap_lightning.analysis.sharpness import score_space_sharpness

    parser = argparse.ArgumentParser(
        prog="s2ap sharpness",
        description=(
            "Score-space sharpness of a mask-search checkpoint: the top Hessian eigenvalue of the robust "
            "loss w.r.t. the scores (power iteration) and the loss increase under the worst per-layer "
            "perturbation of budget gamma."
        ),
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--gamma", type=float, default=0.01)
    parser.add_argument("--max-iter", type=int, default=50)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--out", default=None, help="JSON file (default: beside the checkpoint)")
    _data_args(parser)
    args = parser.parse_args(argv)
    pruner, checkpoint = _pruner(args.checkpoint)
    x, y = _fixed_subset(checkpoint, args)
    report = score_space_sharpness(pruner, x, y, args.gamma, args.max_iter, args.tol, args.seed)
    out = Path(args.out or Path(args.checkpoint).with_suffix(".sharpness.json"))
    out.write_text(
        json.dumps({**report.as_dict(), "checkpoint": args.checkpoint, "split": args.split}, indent=2) + "\n"
    )
    print(json.dumps(report.as_dict(), indent=2))
    print(f"written to {out}")
    return 0


def landscape_command(argv: list[str]) -> int:
    import numpy as np

    from s2ap_lightning.analysis.landscape import landscape_1d, landscape_2d

    parser = argparse.ArgumentParser(
        prog="s2ap landscape",
        description=(
            "1-D or 2-D slice of the robust loss in score space along random directions scaled per layer "
            "to ||s_l||, with the number of mask flips; writes PNG and .npz."
        ),
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--dims", type=int, choices=[1, 2], default=1)
    parser.add_argument("--radius", type=float, default=1.0)
    parser.add_argument("--points", type=int, default=21)
    parser.add_argument("--out", default=None, help="output prefix (default: beside the checkpoint)")
    _data_args(parser, images=128)
    args = parser.parse_args(argv)
    pruner, checkpoint = _pruner(args.checkpoint)
    x, y = _fixed_subset(checkpoint, args)
    grid = np.linspace(-args.radius, args.radius, args.points)
    if args.dims == 1:
        land = landscape_1d(pruner, x, y, grid, seed=args.seed)
    else:
        land = landscape_2d(pruner, x, y, grid, seed=args.seed)
    prefix = args.out or str(Path(args.checkpoint).with_suffix("")) + f".landscape{args.dims}d"
    land.save(prefix)
    land.plot(prefix + ".png", f"{Path(args.checkpoint).parent.name}: {args.dims}-D score-space slice")
    print(f"written {prefix}.png and {prefix}.npz")
    return 0


def security_command(argv: list[str]) -> int:
    import numpy as np

    from s2ap_lightning.analysis.security import security_curve
    from s2ap_lightning.export import plain_model

    parser = argparse.ArgumentParser(
        prog="s2ap security",
        description=("Security curve (robust accuracy against eps) from FMN minimum-norm perturbations."),
    )
    parser.add_argument("checkpoint", help="checkpoint of any stage")
    parser.add_argument("--norm", choices=["linf", "l2"], default="linf")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--max-eps", type=float, default=None, help="default: 2x the training eps")
    parser.add_argument("--out", default=None)
    _data_args(parser, images=500)
    args = parser.parse_args(argv)
    checkpoint = load_file(args.checkpoint)
    model = plain_model(checkpoint).eval()
    x, y = _fixed_subset(checkpoint, args)
    max_eps = args.max_eps or 2 * checkpoint["hyper_parameters"].get("eps", 8 / 255)
    curve = security_curve(model, x, y, np.linspace(0, max_eps, 41), args.norm, args.steps)
    prefix = args.out or str(Path(args.checkpoint).with_suffix("")) + ".security"
    Path(prefix + ".json").write_text(json.dumps(curve.__dict__, indent=2) + "\n")
    curve.plot(prefix + ".png")
    train_eps = checkpoint["hyper_parameters"].get("eps")
    print(
        f"robust accuracy at the training eps {train_eps}: {curve.accuracy_at(train_eps):.4f} "
        f"({len(x)} images); written {prefix}.png and .json"
    )
    return 0


def report_command(argv: list[str]) -> int:
    from s2ap_lightning.analysis.report import write_records_report, write_report

    parser = argparse.ArgumentParser(
        prog="s2ap report",
        description=(
            "Turn a runs folder into report.md with PNG plots: the demo's results.csv, or else every "
            "evaluation record (*.eval.json) that `s2ap test` wrote under the folder."
        ),
    )
    parser.add_argument("runs", nargs="?", default="runs/demo")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report.md")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    if not runs.is_dir():
        raise FileNotFoundError(f"{runs} is not a folder; pass the folder holding the runs to report on")
    refuse_existing(runs / "report.md", args.overwrite)
    # The demo's results.csv when there is one, else every `s2ap test` record under the folder.
    path = write_report(runs) if (runs / "results.csv").is_file() else write_records_report(runs)
    print(f"written {path}")
    return 0


def best_validation_score(path: str | Path) -> float:
    """``val/robust_acc`` of a run's best checkpoint, read from its checkpoint callback's state."""
    path = Path(path)
    ckpt = load_file(path / "best.ckpt" if path.is_dir() else path)
    for key, state in (ckpt.get("callbacks") or {}).items():
        if "val/robust_acc" in key and state.get("best_model_score") is not None:
            return float(state["best_model_score"])
    raise SystemExit(f"{path}: no val/robust_acc score stored in the checkpoint")


def pick_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="s2ap pick",
        description=(
            "Pick among runs (e.g. a gamma sweep) by best validation robust accuracy; never the test set."
        ),
    )
    parser.add_argument("runs", nargs="+", help="run folders holding best.ckpt, or checkpoint files")
    args = parser.parse_args(argv)
    scored = []
    for run in args.runs:
        hp = load_file(Path(run) / "best.ckpt" if Path(run).is_dir() else run).get("hyper_parameters", {})
        scored.append((best_validation_score(run), run, hp.get("gamma")))
    for score, run, gamma in sorted(scored, reverse=True):
        print(f"{score:.4f}  gamma={gamma}  {run}")
    score, run, gamma = max(scored)
    print(f"best: {run} (gamma={gamma}, val/robust_acc {score:.4f})")
    return 0


COMMANDS = {
    "pick": pick_command,
    "hamming": hamming_command,
    "sharpness": sharpness_command,
    "landscape": landscape_command,
    "security": security_command,
    "report": report_command,
}
