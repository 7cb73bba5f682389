"""The tools of ``s2ap`` beside LightningCLI: export, hamming, sharpness, landscape, security, report, pick.

Each tool is a typed function whose docstring documents its options; :func:`run_tool` exposes it
through jsonargparse, so every tool has ``--help``, ``--config`` files and the same conventions as
``s2ap fit`` (options are ``--snake_case``; booleans take ``true``/``false``). The analysis tools
read checkpoints with ``weights_only=True`` and use a fixed subset of a split (validation by
default) of the dataset the checkpoint was trained on, unless told otherwise. This is the CLI layer:
it loads stages, which the analysis modules below it may not.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
from torch import Tensor

from s2ap_lightning.analysis.landscape import landscape_1d, landscape_2d
from s2ap_lightning.analysis.report import read_results_csv, record_rows, write_report
from s2ap_lightning.analysis.security import security_curve
from s2ap_lightning.analysis.sharpness import score_space_sharpness
from s2ap_lightning.analysis.stability import hamming as distance_of
from s2ap_lightning.analysis.stability import load_masks
from s2ap_lightning.checkpoint import load_file, refuse_existing
from s2ap_lightning.data import RobustDataModule
from s2ap_lightning.data.subsets import DataSubset
from s2ap_lightning.evaluation.callback import trained_threat
from s2ap_lightning.export import export as export_file
from s2ap_lightning.export import plain_model
from s2ap_lightning.jobs.cells import load_spec
from s2ap_lightning.jobs.study_report import write_study_report
from s2ap_lightning.stages import ScoreSpaceSAMPruner


def run_tool(fn: Callable[..., int], argv: list[str], name: str) -> int:
    """Parse ``argv`` for ``fn`` (positional arguments: its parameters without defaults) and call it."""
    from jsonargparse import ActionConfigFile, ArgumentParser  # imported when the command runs

    doc = inspect.getdoc(fn) or ""
    params = inspect.signature(fn).parameters
    variadic = getattr(fn, "variadic", None)
    if variadic:
        # Shell globs (`s2ap pick runs/g*`): the leading words are the items of one list parameter.
        n = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))  # --opt, -h
        if n:
            argv = [f"--{variadic}", json.dumps(argv[:n]), *argv[n:]]
    parser = ArgumentParser(prog=f"s2ap {name}", description=doc.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of the options below")
    parser.add_function_arguments(fn, as_group=False, as_positional=not variadic)
    for old, new in getattr(fn, "renamed", {}).items():
        if any(a == f"--{old}" or a.startswith(f"--{old}=") for a in argv):
            raise ValueError(f"s2ap {name} --{old} was renamed --{new}")
    cfg = parser.instantiate_classes(parser.parse_args(argv))  # typed blocks (DataSubset) built
    values = {k: cfg[k] for k in params if k in cfg}
    return fn(**{k: v.as_dict() if hasattr(v, "as_dict") else v for k, v in values.items()})


def _fixed_subset(checkpoint: dict, subset: DataSubset) -> tuple[Tensor, Tensor]:
    """The subset's images, from the data the checkpoint was trained on (or the subset's override)."""
    # Only the DataModule's own arguments (LightningCLI stores extra keys such as `_instantiator`).
    accepted = set(inspect.signature(RobustDataModule.__init__).parameters) - {"self"}
    stored = checkpoint.get("datamodule_hyper_parameters") or {}
    data_hp = {k: v for k, v in stored.items() if k in accepted}
    if subset.dataset:
        data_hp["dataset"] = subset.dataset
    if subset.data_dir:
        data_hp["data_dir"] = subset.data_dir
    data_hp.pop("test_subset", None)
    dm = RobustDataModule(**data_hp)
    dm.setup()
    return subset.tensors(dm.val_set if subset.split == "val" else dm.test_set)


#: The data options each analysis tool took before they became one block (``--subset.*``).
SUBSET_RENAMED = {k: f"subset.{k}" for k in ("images", "split", "dataset", "data_dir")}


def _pruner(path: str) -> tuple[ScoreSpaceSAMPruner, dict]:
    """A mask-search checkpoint's stage (in eval mode, on the CPU) and the checkpoint itself."""
    checkpoint = load_file(path)
    if not any(k.startswith(("method.", "scores.")) for k in checkpoint.get("state_dict", {})):
        raise ValueError(f"{path}: not a mask-search checkpoint (no scores); pass a prune-stage checkpoint")
    module = ScoreSpaceSAMPruner.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    return module.eval(), checkpoint


def export(
    checkpoint: str,
    out: str | None = None,
    overwrite: bool = False,
    reference: Literal["hydra", "harp", "benchmark"] | None = None,
    normalized_inputs: bool = False,
) -> int:
    """Write a mask-search or finetuning checkpoint as a plain state dict, pruned weights exactly zero.

    The file loads with ``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)``, into
    our model or (with ``--reference``) into the reference code's own class.

    Args:
        checkpoint: checkpoint of the prune or finetune stage.
        out: output ``.pt`` file.
        overwrite: replace an existing ``out``.
        reference: ``hydra``, ``harp`` or ``benchmark``: write ``{"state_dict": ...}`` as their loaders
            read it, in the key layout of their class (HYDRA's WRN gets its unused ``sub_block1``).
        normalized_inputs: export a model trained with ``mean``/``std`` anyway, for a loader that
            normalises its inputs itself (refused otherwise: the reference classes take raw inputs).

    """
    if not out:
        raise ValueError("export needs --out FILE (the plain state dict to write)")
    refuse_existing(out, overwrite)
    print(export_file(checkpoint, out, reference=reference, normalized_inputs=normalized_inputs))
    print(f"wrote {out}")
    return 0


def hamming(a: str, b: str, per_layer: bool = False) -> int:
    """Normalised Hamming distance between two masks (e.g. the final masks of two seeds).

    Args:
        a: a stage checkpoint, an exported pruned state dict, or a packed mask file.
        b: the same kinds of file.
        per_layer: also print the distance of every layer.

    """
    distance, layers = distance_of(load_masks(a), load_masks(b))
    if per_layer:
        for name, value in layers.items():
            print(f"{name:40s} {value:.6f}")
    print(f"hamming (normalised): {distance:.6f}")
    return 0


def sharpness(
    checkpoint: str,
    rho: float = 0.01,
    max_iter: int = 50,
    tol: float = 1e-3,
    out: str | None = None,
    subset: DataSubset = DataSubset(images=256),
    seed: int = 0,
    overwrite: bool = False,
) -> int:
    """Score-space sharpness of a mask-search checkpoint, on the robust loss the search used.

    The top Hessian eigenvalue of that loss w.r.t. the scores (power iteration) and the loss increase
    under the worst per-layer perturbation of relative budget ``rho``.

    Args:
        checkpoint: a mask-search checkpoint.
        rho: relative budget of the worst-case perturbation (the sharpness radius; ``--gamma`` before,
            renamed so that ``gamma`` only ever means the search's S2AP radius).
        max_iter: power-iteration cap.
        tol: relative change of the eigenvalue at which the iteration stops.
        out: JSON file (default: beside the checkpoint).
        subset: the images (``--subset.images``, ``--subset.split val|test``, ``--subset.seed``,
            ``--subset.dataset``, ``--subset.data_dir``): a seeded, class-stratified sample.
        seed: seed of the adversarial examples and the start vector.
        overwrite: replace an existing output file.

    """
    path = Path(out or Path(checkpoint).with_suffix(".sharpness.json"))
    refuse_existing(path, overwrite)
    pruner, ckpt = _pruner(checkpoint)
    x, y = _fixed_subset(ckpt, subset)
    report = score_space_sharpness(pruner.objective(), x, y, rho, max_iter, tol, seed)
    path.write_text(
        json.dumps({**report.as_dict(), "checkpoint": checkpoint, "subset": asdict(subset)}, indent=2) + "\n"
    )
    print(json.dumps(report.as_dict(), indent=2))
    print(f"written to {path}")
    return 0


sharpness.renamed = {"gamma": "rho", **SUBSET_RENAMED}  # type: ignore[attr-defined]


def landscape(
    checkpoint: str,
    dims: Literal[1, 2] = 1,
    radius: float = 1.0,
    points: int = 21,
    out: str | None = None,
    subset: DataSubset = DataSubset(images=128),
    seed: int = 0,
    overwrite: bool = False,
) -> int:
    """1-D or 2-D slice of the search's robust loss in score space, with the number of mask flips.

    Random directions are scaled per layer to ``||s_l||``; writes a PNG and an ``.npz``.

    Args:
        checkpoint: a mask-search checkpoint.
        dims: 1 or 2 directions.
        radius: the slice spans ``[-radius, radius]`` along each direction.
        points: grid points per direction.
        out: output prefix (default: beside the checkpoint).
        subset: the images (``--subset.images``, ``--subset.split val|test``, ``--subset.seed``,
            ``--subset.dataset``, ``--subset.data_dir``): a seeded, class-stratified sample.
        seed: seed of the directions and adversarial examples.
        overwrite: replace existing output files.

    """
    prefix = out or str(Path(checkpoint).with_suffix("")) + f".landscape{dims}d"
    for suffix in (".png", ".npz"):
        refuse_existing(prefix + suffix, overwrite)
    pruner, ckpt = _pruner(checkpoint)
    x, y = _fixed_subset(ckpt, subset)
    grid = np.linspace(-radius, radius, points)
    land = (landscape_1d if dims == 1 else landscape_2d)(pruner.objective(), x, y, grid, seed=seed)
    land.save(prefix)
    land.plot(prefix + ".png", f"{Path(checkpoint).parent.name}: {dims}-D score-space slice")
    print(f"written {prefix}.png and {prefix}.npz")
    return 0


landscape.renamed = SUBSET_RENAMED  # type: ignore[attr-defined]


def security(
    checkpoint: str,
    norm: Literal["linf", "l2"] = "linf",
    steps: int = 100,
    max_eps: float | None = None,
    out: str | None = None,
    subset: DataSubset = DataSubset(images=500),
    seed: int = 0,
    overwrite: bool = False,
) -> int:
    """Security curve (robust accuracy against eps) from FMN minimum-norm perturbations.

    Args:
        checkpoint: checkpoint of any stage.
        norm: ``linf`` or ``l2``.
        steps: FMN steps.
        max_eps: largest eps of the curve (default: twice the training eps).
        out: output prefix (default: beside the checkpoint).
        subset: the images (``--subset.images``, ``--subset.split val|test``, ``--subset.seed``,
            ``--subset.dataset``, ``--subset.data_dir``): a seeded, class-stratified sample.
        seed: unused by FMN; kept so every analysis tool takes the same data options.
        overwrite: replace existing output files.

    """
    prefix = out or str(Path(checkpoint).with_suffix("")) + ".security"
    for suffix in (".png", ".json"):
        refuse_existing(prefix + suffix, overwrite)
    ckpt = load_file(checkpoint)
    model = plain_model(ckpt).eval()
    x, y = _fixed_subset(ckpt, subset)
    top = max_eps or 2 * (trained_threat(ckpt["hyper_parameters"])["eps"] or 8 / 255)
    curve = security_curve(model, x, y, np.linspace(0, top, 41), norm, steps)
    Path(prefix + ".json").write_text(json.dumps(curve.__dict__, indent=2) + "\n")
    curve.plot(prefix + ".png")
    train_eps = trained_threat(ckpt["hyper_parameters"])["eps"]
    print(
        f"robust accuracy at the training eps {train_eps}: {curve.accuracy_at(train_eps):.4f} "
        f"({len(x)} images); written {prefix}.png and .json"
    )
    return 0


security.renamed = SUBSET_RENAMED  # type: ignore[attr-defined]


def report(runs: str, overwrite: bool = False) -> int:
    """Turn a runs folder into a Markdown report with PNG plots.

    From the folder's ``results.csv`` (``s2ap demo``) into ``report.md``; from a study folder
    (``cells/`` and ``spec.yaml`` of ``s2ap study``, of any version) into ``study.md`` and ``study.csv``;
    else from every evaluation record (``*.eval.json``) that ``s2ap test`` wrote under it into
    ``report.md``.

    Args:
        runs: the folder holding the runs.
        overwrite: replace an existing report.

    """
    folder = Path(runs)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the folder holding the runs to report on")
    if (folder / "results.csv").is_file():
        refuse_existing(folder / "report.md", overwrite)
        path = write_report(folder, read_results_csv(folder / "results.csv"))
    elif (folder / "spec.yaml").is_file() and (folder / "cells").is_dir():
        refuse_existing(folder / "study.md", overwrite)
        path = write_study_report(load_spec(folder))
    else:
        refuse_existing(folder / "report.md", overwrite)
        path = write_report(folder, record_rows(folder), title=f"Evaluation records under `{folder}`")
    print(f"written {path}")
    return 0


def best_validation_score(ckpt: dict, source: str) -> float:
    """``val/robust_acc`` of a run's best checkpoint, read from its checkpoint callback's state."""
    for key, state in (ckpt.get("callbacks") or {}).items():
        if "val/robust_acc" in key and state.get("best_model_score") is not None:
            return float(state["best_model_score"])
    raise ValueError(f"{source}: no val/robust_acc score stored in the checkpoint")


def pick(runs: list[str]) -> int:
    """Pick among runs (e.g. a gamma sweep) by best validation robust accuracy; never the test set.

    Args:
        runs: run folders holding best.ckpt, or checkpoint files.

    """
    scored = []
    for run in runs:
        ckpt = load_file(Path(run) / "best.ckpt" if Path(run).is_dir() else run)
        scored.append((best_validation_score(ckpt, run), run, ckpt.get("hyper_parameters", {}).get("gamma")))
    for score, run, gamma in sorted(scored, reverse=True):
        print(f"{score:.4f}  gamma={gamma}  {run}")
    score, run, gamma = max(scored)
    print(f"best: {run} (gamma={gamma}, val/robust_acc {score:.4f})")
    return 0


pick.variadic = "runs"  # type: ignore[attr-defined]


TOOLS: dict[str, Callable[..., int]] = {
    "export": export,
    "pick": pick,
    "hamming": hamming,
    "sharpness": sharpness,
    "landscape": landscape,
    "security": security,
    "report": report,
}
