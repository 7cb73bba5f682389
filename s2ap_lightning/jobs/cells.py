"""A study's spec and its cells: the units of work every study (and the demo) is made of.

A study is a grid of *cells*: per seed one robust pretraining, then per (base method, sparsity) one
mask search of the base method and one per S2AP gamma, all from that pretraining, then the finetuning
and evaluation of the base mask and of the S2AP mask whose gamma won on validation. Each cell writes
one JSON result when it has finished (a :class:`~s2ap_lightning.analysis.report.ResultRow` plus what
the pairing checks need); :func:`study_rows` reads them back as result rows. How the cells are run
(in order here, or one SLURM job each) is :mod:`s2ap_lightning.jobs.study`'s business.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from s2ap_lightning.analysis.report import FINETUNE_ARMS, ResultRow
from s2ap_lightning.analysis.sharpness import score_space_sharpness
from s2ap_lightning.checkpoint import atomic_file, load_file, model_state_dict
from s2ap_lightning.data import RobustDataModule, split_tensors
from s2ap_lightning.evaluation import EvalProtocol, write_record
from s2ap_lightning.evaluation.record import git_commit
from s2ap_lightning.export import plain_model, sparsity_table
from s2ap_lightning.jobs.common import (
    describe_threat,
    evaluation_of,
    robust_accuracy,
    stage_module,
    stage_trainer,
    threat_of,
)
from s2ap_lightning.models import MODELS
from s2ap_lightning.pruning.methods import BASE_METHODS, method_from_config
from s2ap_lightning.stages import ScoreSpaceSAMPruner
from s2ap_lightning.stages.callbacks import MaskStabilityCallback
from s2ap_lightning.stages.hparams import upgrade_checkpoint_hparams
from s2ap_lightning.stages.training import ATTACK_PRECISIONS

LAUNCHERS = ("local", "slurm", "submitit_local")
#: A pruned model of a study: the base method's mask, or S2AP's (gamma chosen on validation).
VARIANTS = ("base", "s2ap")
KINDS = ("pretrain", "search", "finetune")
#: Settings of the DataModule a data config or ``data`` may give.
DATA_KEYS = tuple(p for p in inspect.signature(RobustDataModule.__init__).parameters if p != "self")


def _check_grid(name: str, values: list[Any], valid: str, ok: Any) -> None:
    """One axis of the grid: not empty, every value valid, none repeated.

    A repeated value would pair a run with itself, and its cell would run twice into one folder.
    """
    if not values:
        raise ValueError(f"{name}=[]: the grid is empty; give at least one value ({valid})")
    bad = [v for v in values if not ok(v)]
    if bad:
        raise ValueError(f"{name}={values!r}: {bad[0]!r} is not valid; valid: {valid}")
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise ValueError(f"{name}={values!r}: {repeated[0]!r} is repeated; give each value once")


@dataclass
class StudySpec:
    """A study: the data and threat model, the grid, the epochs of each stage, how to run it.

    Args:
        name: the study's name (also the default folder under ``results/``).
        data_config: a ``configs/data/*.yaml`` file: its ``data`` block builds the DataModule and its
            ``model.init_args`` give the model and threat model (``eps``, ``step_size``, ...); null to
            give everything below.
        data: DataModule settings over the data config's (e.g. ``{dataset: digits, batch_size: 128}``).
        model: architecture, over the data config's.
        eps: attack budget of training and evaluation, over the data config's.
        step_size: PGD step size, over the data config's.
        out: study folder (default ``results/<name>``).
        base_methods: ``hydra`` and/or ``harp``.
        method_options: options of a base method over its defaults, ``{harp: {size_loss_weight: 5}}``
            (the same for its search alone and under S2AP).
        sparsities: pruned fractions, each in (0, 1).
        gammas: S2AP's score-space radii; one search per gamma, the best on validation is kept.
        seeds: one robust pretraining per seed, shared by every method of that seed; every sparsity
            runs every one of them.
        extra_seeds: more seeds at some sparsities, ``{sparsity: [seed, ...]}`` (e.g. 20 seeds where
            the answer is close, 10 elsewhere). Each extra seed has its own pretraining, shared by
            every sparsity that lists it; it must not repeat a seed of ``seeds``.
        pretrain_epochs: epochs of robust pretraining.
        prune_epochs: epochs of every mask search.
        warmup_epochs: plain base-method epochs before S2AP starts (the same for every gamma).
        finetune_epochs: epochs of finetuning (the same for every method).
        pretrain_lr: SGD learning rate of pretraining.
        prune_lr: SGD learning rate of the scores.
        finetune_lr: SGD learning rate of finetuning.
        awp: finetune every method with AWP (``awp_gamma``), or none of them: the one-arm form of
            ``finetune_arms`` (``[awp]`` or ``[plain]``), kept so that earlier ``spec.yaml`` files
            still describe their cells.
        finetune_arms: finetuning recipes, each applied to every method: ``plain`` (adversarial
            finetuning) and/or ``awp`` (with AWP, the paper's recipe). Each arm finetunes the same
            searched masks with the same epochs, learning rate and seed; null: the ``awp`` flag's one
            arm (and the cell names earlier versions wrote).
        awp_gamma: AWP's relative weight-perturbation radius (> 0), when an arm uses AWP.
        select_pgd_steps: PGD steps of the validation accuracy that chooses gamma.
        eval_pgd_steps: PGD steps of the test evaluation (the weaker check attack runs 10).
        aa_images: test images attacked by AutoAttack (class-stratified, seeded; 0 skips it).
        sharpness_images: validation images of lambda_max, the top Hessian eigenvalue of the robust
            loss w.r.t. the scores after the search (0 skips it).
        sharpness_iters: power iterations of lambda_max.
        collapse_margin: a finetuned model whose clean test accuracy is at most the majority-class
            rate plus this margin is *collapsed* (:class:`~s2ap_lightning.evaluation.EvalProtocol`):
            named as such and left out of the paired reading.
        threads: torch CPU threads of each cell's process (0: torch's default with one worker, the
            CPU cores shared out with several).
        workers: cells run at once by the ``local`` launcher, each in its own process, dependencies
            respected (a search after its pretraining, a finetuning after its searches).
        accelerator: Lightning accelerator of every stage (``cpu``, ``gpu``, ``auto``).
        precision: Lightning precision of every stage (``32-true``, ``bf16-mixed``).
        attack_precision: precision of the training attacks of every stage (``fp32`` or
            ``training``; see ``RobustTask``). Evaluations attack in fp32 regardless.
        compile: ``torch.compile`` the model in training attacks and losses of every stage.
        progress: progress bars inside stages.
        launcher: ``local`` (in order, this process), ``slurm`` (one submitit job per cell) or
            ``submitit_local`` (submitit's local executor; what the tests use).
        slurm: submitit parameters for ``slurm`` (e.g. ``timeout_min``, ``gpus_per_node``,
            ``slurm_partition``, ``slurm_additional_parameters``).

    """

    name: str = "study"
    data_config: str | None = "configs/data/digits.yaml"
    data: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    eps: float | None = None
    step_size: float | None = None
    out: str | None = None
    base_methods: list[str] = field(default_factory=lambda: ["hydra"])
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    sparsities: list[float] = field(default_factory=lambda: [0.9, 0.99])
    gammas: list[float] = field(default_factory=lambda: [0.001, 0.005, 0.05])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    extra_seeds: dict[float, list[int]] = field(default_factory=dict)
    pretrain_epochs: int = 20
    prune_epochs: int = 10
    warmup_epochs: int = 2
    finetune_epochs: int = 8
    pretrain_lr: float = 0.1
    prune_lr: float = 0.1
    finetune_lr: float = 0.01
    awp: bool = False
    finetune_arms: list[str] | None = None
    awp_gamma: float | None = 0.005
    select_pgd_steps: int = 20
    eval_pgd_steps: int = 20
    aa_images: int = 200
    sharpness_images: int = 256
    sharpness_iters: int = 20
    collapse_margin: float = EvalProtocol.collapse_margin
    threads: int = 0
    workers: int = 1
    accelerator: str = "cpu"
    precision: str = "32-true"
    attack_precision: str = "fp32"
    compile: bool = False
    progress: bool = False
    launcher: str = "local"
    slurm: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Every value a cell would trip over, refused here, before any cell runs.
        _check_grid("base_methods", self.base_methods, ", ".join(BASE_METHODS), lambda m: m in BASE_METHODS)
        _check_grid("sparsities", self.sparsities, "pruned fractions in (0, 1)", lambda s: 0.0 < s < 1.0)
        _check_grid(
            "gammas", self.gammas, "S2AP radii > 0 (gamma 0, the base method, always runs)", lambda g: g > 0
        )
        _check_grid("seeds", self.seeds, "distinct integers", lambda s: isinstance(s, int))
        if self.awp and not (self.awp_gamma is not None and self.awp_gamma > 0):
            raise ValueError(
                f"awp=true without AWP settings: awp_gamma={self.awp_gamma!r} must be > 0 (AWP's relative "
                "weight-perturbation radius, e.g. 0.005), or set awp: false"
            )
        self._check_arms()
        self._check_extra_seeds()
        self._check_method_options()
        if self.attack_precision not in ATTACK_PRECISIONS:
            valid = ", ".join(ATTACK_PRECISIONS)
            raise ValueError(f"attack_precision={self.attack_precision!r} is unknown; valid: {valid}")
        for name in (
            "pretrain_epochs",
            "prune_epochs",
            "finetune_epochs",
            "select_pgd_steps",
            "eval_pgd_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("aa_images", "sharpness_images", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers={self.workers!r} must be an integer >= 1 (cells run at once)")
        if self.workers > 1 and self.launcher != "local":
            raise ValueError(
                f"workers={self.workers} runs cells in local processes, but launcher={self.launcher!r} "
                "runs each cell as its own job: set workers: 1, or launcher: local"
            )
        if not 0.0 <= self.collapse_margin < 1.0:
            raise ValueError(
                f"collapse_margin={self.collapse_margin} must lie in [0, 1) (a fraction of the test images, "
                "e.g. 0.02: two points above the majority-class rate)"
            )
        if not 0 <= self.warmup_epochs < self.prune_epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} must lie in [0, prune_epochs={self.prune_epochs})"
            )
        for name in ("eps", "step_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0 (or null: the data config's)")
        if self.model is not None and self.model not in MODELS:
            raise ValueError(f"model={self.model!r} is unknown; valid: {', '.join(sorted(MODELS))}")
        _check_data_keys(self.data, "data")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher={self.launcher!r} is unknown; valid: {', '.join(LAUNCHERS)}")

    def _check_arms(self) -> None:
        if self.finetune_arms is None:
            return
        _check_grid(
            "finetune_arms", self.finetune_arms, ", ".join(FINETUNE_ARMS), lambda a: a in FINETUNE_ARMS
        )
        if self.awp and "awp" not in self.finetune_arms:
            raise ValueError(
                f"awp=true asks for AWP finetuning, but finetune_arms={self.finetune_arms!r} has no awp arm: "
                "add awp to finetune_arms, or set awp: false"
            )
        if "awp" in self.finetune_arms and not (self.awp_gamma is not None and self.awp_gamma > 0):
            raise ValueError(
                f"finetune_arms={self.finetune_arms!r} has an awp arm without AWP settings: "
                f"awp_gamma={self.awp_gamma!r} must be > 0 (e.g. 0.005)"
            )

    def _check_extra_seeds(self) -> None:
        if not isinstance(self.extra_seeds, dict):
            raise ValueError(
                f"extra_seeds={self.extra_seeds!r} must map a sparsity to a list of seeds, "
                "e.g. {0.998: [11, 12]}"
            )
        normalised = {}
        for sp, extra in self.extra_seeds.items():
            try:  # a YAML key 0.998 is a float already; a JSON flag's "0.998" is not
                normalised[float(sp)] = extra
            except (TypeError, ValueError):
                raise ValueError(
                    f"extra_seeds: key {sp!r} is not a sparsity; valid: one of sparsities"
                ) from None
        self.extra_seeds = normalised
        for sp, extra in self.extra_seeds.items():
            if sp not in self.sparsities:
                raise ValueError(
                    f"extra_seeds: sparsity {sp!r} is not in sparsities={self.sparsities!r}; "
                    "valid: one of sparsities"
                )
            if not isinstance(extra, list):
                raise ValueError(f"extra_seeds[{sp:g}]={extra!r} must be a list of seeds")
            _check_grid(f"extra_seeds[{sp:g}]", extra, "distinct integers", lambda s: isinstance(s, int))
            shared = [s for s in extra if s in self.seeds]
            if shared:
                raise ValueError(
                    f"extra_seeds[{sp:g}]={extra!r}: seed {shared[0]} is already in seeds={self.seeds!r} "
                    "(which run at every sparsity); give each seed once"
                )

    def _check_method_options(self) -> None:
        for name in self.method_options:
            if name not in self.base_methods:
                raise ValueError(
                    f"method_options: {name!r} is not one of base_methods={self.base_methods!r}; valid: "
                    f"{', '.join(self.base_methods)}"
                )
            try:
                self.method_config(name)
            except (ValueError, TypeError) as error:
                raise ValueError(f"method_options[{name}]: {error}") from None

    def method_config(self, name: str) -> str | dict[str, Any]:
        """The base method ``name`` as its search builds it: the name, or its options over the defaults."""
        options = self.method_options.get(name)
        if not options:
            return name
        method_from_config({"class_path": name, "init_args": dict(options)})  # an unknown option fails here
        return {"class_path": name, "init_args": dict(options)}

    @property
    def arms(self) -> list[str]:
        """The finetuning arms: ``finetune_arms``, or the one arm of the ``awp`` flag."""
        return (
            list(self.finetune_arms) if self.finetune_arms is not None else ["awp" if self.awp else "plain"]
        )

    def seeds_at(self, sparsity: float) -> list[int]:
        """The seeds of one sparsity: ``seeds``, then that sparsity's ``extra_seeds``."""
        return [*self.seeds, *self.extra_seeds.get(sparsity, [])]

    @property
    def all_seeds(self) -> list[int]:
        """Every seed of the study (one pretraining each): ``seeds``, then the extra ones by sparsity."""
        return list(
            dict.fromkeys([*self.seeds, *(s for sp in self.sparsities for s in self.extra_seeds.get(sp, []))])
        )

    @property
    def folder(self) -> Path:
        return Path(self.out or f"results/{self.name}")

    def trainer_settings(self) -> dict[str, str]:
        """The Trainer options every stage of the study shares."""
        return {"accelerator": self.accelerator, "precision": self.precision}

    def data_settings(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(DataModule kwargs, model kwargs)``: the data config's, the spec's own settings over them."""
        config: dict[str, Any] = {}
        if self.data_config is not None:
            if not Path(self.data_config).is_file():
                raise FileNotFoundError(
                    f"data_config={self.data_config!r} does not exist (see configs/data/)"
                )
            config = yaml.safe_load(Path(self.data_config).read_text()) or {}
        data = dict(config.get("data") or {})
        data = dict(data.get("init_args", data))
        data.pop("class_path", None)
        _check_data_keys(data, f"data_config={self.data_config!r}: data")
        model = dict(config.get("model") or {})
        model = dict(model.get("init_args", model))  # the data configs' form, or a flat block
        model.pop("class_path", None)
        # Flat eps/step_size/attack_steps (older data configs) into the threat block, then the spec's own.
        model = upgrade_checkpoint_hparams(model)
        threat = dict(model.get("threat") or {})
        overrides = {"eps": self.eps, "step_size": self.step_size}
        threat.update({k: v for k, v in overrides.items() if v is not None})
        if threat:
            model["threat"] = threat
        if self.model is not None:
            model["model"] = self.model
        return {**data, **self.data}, model


def _check_data_keys(data: dict[str, Any], where: str) -> None:
    unknown = [k for k in data if k not in DATA_KEYS]
    if unknown:
        raise ValueError(
            f"{where}: {unknown[0]!r} is not a DataModule setting; valid: {', '.join(DATA_KEYS)}"
        )


def save_spec(spec: StudySpec) -> Path:
    """``spec.yaml`` in the study folder: what the cells there were run with."""
    path = spec.folder / "spec.yaml"
    with atomic_file(path, "w") as fh:  # makes the folder; a crash keeps the previous spec whole
        fh.write(yaml.safe_dump(asdict(spec), sort_keys=False))
    return path


def load_spec(folder: str | Path) -> StudySpec:
    """The spec of a study folder (its ``spec.yaml``), with ``out`` that folder wherever it was run.

    Keys this version no longer has are left out, new ones take their defaults: any earlier study
    folder can be reported on.
    """
    folder = Path(folder)
    raw = yaml.safe_load((folder / "spec.yaml").read_text()) or {}
    known = {f.name for f in fields(StudySpec)}
    return StudySpec(**{**{k: v for k, v in raw.items() if k in known}, "out": str(folder)})


# ----------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """One unit of work; ``key`` is its folder and JSON name inside the study folder.

    Args:
        kind: ``pretrain``, ``search`` or ``finetune``.
        seed: the seed of the cell (its pretraining's).
        base_method: search and finetune: the score-based method.
        sparsity: search and finetune: the pruned fraction.
        variant: search and finetune: ``base`` or ``s2ap``.
        gamma: an ``s2ap`` search: its S2AP radius (> 0). Otherwise 0: a finetune cell's S2AP gamma
            is chosen on validation when it runs.
        arm: finetune: the finetuning arm (``plain`` or ``awp``), part of the cell's name; ``""``:
            the spec's ``awp`` flag decides, and the cell has the name earlier versions gave it.

    """

    kind: str
    seed: int
    base_method: str = ""
    sparsity: float = 0.0
    variant: str = ""
    gamma: float = 0.0
    arm: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"cell kind={self.kind!r} is unknown; valid: {', '.join(KINDS)}")
        if self.kind == "pretrain":
            return
        if self.variant not in VARIANTS:
            raise ValueError(
                f"{self.kind} cell: variant={self.variant!r} is unknown; valid: {', '.join(VARIANTS)}"
            )
        if self.kind == "search" and (self.variant == "s2ap") != (self.gamma > 0):
            raise ValueError(
                f"search cell: variant={self.variant!r} with gamma={self.gamma}: S2AP has gamma > 0"
            )
        if self.kind == "finetune" and self.gamma:
            raise ValueError(f"finetune cell: gamma={self.gamma}: S2AP's gamma is chosen on validation")
        if self.arm and (self.kind != "finetune" or self.arm not in FINETUNE_ARMS):
            raise ValueError(
                f"{self.kind} cell: arm={self.arm!r}: only finetune cells have an arm, one of "
                f"{', '.join(FINETUNE_ARMS)}"
            )

    @classmethod
    def pretrain(cls, seed: int) -> Cell:
        return cls("pretrain", seed)

    @classmethod
    def search(cls, seed: int, base_method: str, sparsity: float, gamma: float) -> Cell:
        """The search of the base method (``gamma`` 0) or of S2AP at ``gamma``."""
        return cls("search", seed, base_method, sparsity, "s2ap" if gamma > 0 else "base", gamma)

    @classmethod
    def finetune(cls, seed: int, base_method: str, sparsity: float, variant: str, arm: str = "") -> Cell:
        return cls("finetune", seed, base_method, sparsity, variant, arm=arm)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        """A cell from ``asdict(cell)``, also as older versions wrote it.

        Their finetune cells had no ``variant`` and used ``gamma`` as a flag (0: the base method,
        1: S2AP): a job queued by an older version still runs the cell it was queued for.
        """
        d = dict(data)
        if d["kind"] == "search" and not d.get("variant"):
            d["variant"] = "s2ap" if d.get("gamma") else "base"
        if d["kind"] == "finetune" and not d.get("variant"):
            d["variant"], d["gamma"] = ("s2ap" if d.get("gamma") else "base"), 0.0
        return cls(**d)

    @property
    def key(self) -> str:
        if self.kind == "pretrain":
            return f"seed{self.seed}/pretrain"
        tag = f"{self.base_method}_sp{self.sparsity:g}"
        if self.kind == "search":
            return f"seed{self.seed}/search/{tag}_g{self.gamma:g}"
        return f"seed{self.seed}/finetune/{tag}_{self.variant}" + (f"_{self.arm}" if self.arm else "")

    def arm_of(self, spec: StudySpec) -> str:
        """The finetuning arm this finetune cell runs: its own, or the one of the spec's ``awp`` flag."""
        return self.arm or spec.arms[0]


def cells_of(spec: StudySpec) -> list[list[Cell]]:
    """The grid in dependency waves: pretraining, then mask searches, then finetuning.

    Every seed of a sparsity (``seeds`` and that sparsity's ``extra_seeds``) gets the base method's
    search and one per gamma, and each finetuning arm finetunes the base mask and the chosen S2AP
    mask. A spec without ``finetune_arms`` names its finetune cells as earlier versions did.
    """
    pretrain = [Cell.pretrain(s) for s in spec.all_seeds]
    grid = [(s, m, sp) for s in spec.all_seeds for m in spec.base_methods for sp in spec.sparsities
            if s in spec.seeds_at(sp)]  # fmt: skip
    search = [Cell.search(s, m, sp, g) for s, m, sp in grid for g in [0.0, *spec.gammas]]
    arms = spec.finetune_arms if spec.finetune_arms is not None else [""]
    finetune = [Cell.finetune(s, m, sp, v, a) for s, m, sp in grid for a in arms for v in VARIANTS]
    return [pretrain, search, finetune]


def depends_on(cell: Cell, spec: StudySpec) -> list[Cell]:
    if cell.kind == "search":
        return [Cell.pretrain(cell.seed)]
    if cell.kind == "finetune":
        gammas = list(spec.gammas) if cell.variant == "s2ap" else [0.0]
        return [Cell.search(cell.seed, cell.base_method, cell.sparsity, g) for g in gammas]
    return []


def result_path(spec: StudySpec, cell: Cell) -> Path:
    return spec.folder / "cells" / f"{cell.key}.json"


def read_result(spec: StudySpec, cell: Cell) -> dict[str, Any] | None:
    path = result_path(spec, cell)
    return json.loads(path.read_text()) if path.is_file() else None


def weights_hash(checkpoint_path: str | Path) -> str:
    """SHA-256 of a checkpoint's model weights (the pairing check: same start for every method)."""
    state = model_state_dict(load_file(checkpoint_path))
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class StudyContext:
    """Data, stage settings, threat model and fixed evaluation tensors of a study, built once per process."""

    def __init__(self, spec: StudySpec) -> None:
        data_kw, model_kw = spec.data_settings()
        self.dm = RobustDataModule(**data_kw)
        self.dm.setup()
        self.settings = {
            **model_kw,
            "num_classes": self.dm.num_classes,
            "in_channels": self.dm.in_channels,
            "image_size": self.dm.image_size,
            "attack_precision": spec.attack_precision,
            "compile": spec.compile,
        }
        self.threat = threat_of(self.settings)
        #: What every row of this study shares.
        self.what = {
            "dataset": str(self.dm.hparams.get("dataset", "")),
            "threat": describe_threat(self.threat),
        }
        self.x_val, self.y_val = split_tensors(self.dm.val_set)
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None

    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Read by the pretrain and finetune cells only (never by a search, so never by selection);
        # built once per process.
        if self._test is None:
            self._test = split_tensors(self.dm.test_set)
        return self._test

    def evaluate(self, spec: StudySpec, model: torch.nn.Module, seed: int) -> Any:
        x_test, y_test = self.test_tensors()
        return evaluation_of(
            model,
            x_test,
            y_test,
            self.threat,
            pgd_steps=spec.eval_pgd_steps,
            aa_images=spec.aa_images,
            seed=seed,
            collapse_margin=spec.collapse_margin,
        )


def _fresh(folder: Path) -> Path:
    # A half-written cell (killed mid-way) is redone from scratch: its folder never mixes two runs.
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def run_cell(spec: StudySpec, cell: Cell, ctx: StudyContext | None = None) -> dict[str, Any]:
    """Run one cell (unless its result exists) and write its JSON result; return the result."""
    done = read_result(spec, cell)
    if done is not None:
        return done
    for dep in depends_on(cell, spec):
        if read_result(spec, dep) is None:
            raise RuntimeError(f"cell {cell.key} needs {dep.key}, which has not finished")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    ctx = ctx or StudyContext(spec)
    started = time.time()
    folder = _fresh(spec.folder / "runs" / cell.key)
    row, extras = {"pretrain": _pretrain, "search": _search, "finetune": _finetune}[cell.kind](
        spec, cell, ctx, folder
    )
    row = replace(row, source=cell.key, wall_s=round(time.time() - started, 1), git_commit=git_commit())
    result = {**row.as_dict(), **extras, "cell": cell.key, "kind": cell.kind}
    write_record(result_path(spec, cell), result)
    return result


def _pretrain(
    spec: StudySpec, cell: Cell, ctx: StudyContext, folder: Path
) -> tuple[ResultRow, dict[str, Any]]:
    L.seed_everything(cell.seed, verbose=False)
    module = stage_module("pretrain", ctx.settings, lr=spec.pretrain_lr)
    stage_trainer(folder, spec.pretrain_epochs, spec.progress, **spec.trainer_settings()).fit(
        module, datamodule=ctx.dm
    )
    ckpt = folder / "best.ckpt"
    record = ctx.evaluate(spec, plain_model(load_file(ckpt)), cell.seed)
    row = ResultRow.from_record(
        record,
        seed=cell.seed,
        variant="dense",
        sparsity=0.0,
        stage="pretrain",
        global_sparsity=0.0,
        checkpoint=str(ckpt),
        **ctx.what,
    )
    return row, {"weights_sha256": weights_hash(ckpt)}


def _search(spec: StudySpec, cell: Cell, ctx: StudyContext, folder: Path) -> tuple[ResultRow, dict[str, Any]]:
    pretrained = read_result(spec, Cell.pretrain(cell.seed))["checkpoint"]
    L.seed_everything(cell.seed, verbose=False)
    stability = MaskStabilityCallback(dirpath=str(folder / "masks"))
    pruner = stage_module(
        "search",
        ctx.settings,
        lr=spec.prune_lr,
        init_from=pretrained,
        sparsity=cell.sparsity,
        gamma=cell.gamma,
        base_method=spec.method_config(cell.base_method),
        warmup_epochs=spec.warmup_epochs if cell.variant == "s2ap" else 0,
    )
    stage_trainer(folder, spec.prune_epochs, spec.progress, [stability], **spec.trainer_settings()).fit(
        pruner, datamodule=ctx.dm
    )
    ckpt = folder / "best.ckpt"
    masked = plain_model(load_file(ckpt))
    val_acc = robust_accuracy(
        masked, ctx.x_val, ctx.y_val, ctx.threat, steps=spec.select_pgd_steps, seed=cell.seed
    )
    sharp = None
    if spec.sharpness_images:
        best = ScoreSpaceSAMPruner.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
        n = min(spec.sharpness_images, len(ctx.x_val))
        sharp = score_space_sharpness(
            best.objective(),
            ctx.x_val[:n],
            ctx.y_val[:n],
            rho=max(cell.gamma, 0.01),
            max_iter=spec.sharpness_iters,
            seed=cell.seed,
        )
    history = stability.history
    row = ResultRow(
        seed=cell.seed,
        base_method=cell.base_method,
        variant=cell.variant,
        sparsity=cell.sparsity,
        gamma=cell.gamma if cell.variant == "s2ap" else None,
        stage="search",
        selected=False,
        val_mask_pgd_acc=val_acc,
        n_val=len(ctx.x_val),
        mask_hamming_last_epoch=history[-1]["hamming"] if history else None,
        lambda_max=None if sharp is None else sharp.lambda_max,
        sharpness=None if sharp is None else sharp.sharpness,
        checkpoint=str(ckpt),
        search_checkpoint=str(ckpt),
        **ctx.what,
    )
    # Hashed from the file this search started from, not copied from the pretrain cell's record:
    # a pretrain checkpoint replaced after its cell finished would show as a broken pairing.
    return row, {"init_sha256": weights_hash(pretrained)}


def choose_gamma(
    spec: StudySpec, seed: int, base_method: str, sparsity: float
) -> tuple[float, dict[float, float]]:
    """The gamma whose searched mask has the best validation PGD accuracy (ties: the smaller gamma).

    Reads only the search cells' validation figures: test data never enters the choice.
    """
    scores = {}
    for g in spec.gammas:
        result = read_result(spec, Cell.search(seed, base_method, sparsity, g))
        scores[g] = float(result["val_mask_pgd_acc"])
    best = max(sorted(scores), key=lambda g: scores[g])
    return best, scores


def _finetune(
    spec: StudySpec, cell: Cell, ctx: StudyContext, folder: Path
) -> tuple[ResultRow, dict[str, Any]]:
    gamma, scores = 0.0, {}
    if cell.variant == "s2ap":
        gamma, scores = choose_gamma(spec, cell.seed, cell.base_method, cell.sparsity)
    search = read_result(spec, Cell.search(cell.seed, cell.base_method, cell.sparsity, gamma))
    searched = ResultRow.from_dict(search)
    L.seed_everything(cell.seed, verbose=False)
    finetuner = stage_module(
        "finetune",
        ctx.settings,
        lr=spec.finetune_lr,
        init_from=search["checkpoint"],
        awp_gamma=spec.awp_gamma if cell.arm_of(spec) == "awp" else 0.0,
    )
    stage_trainer(folder, spec.finetune_epochs, spec.progress, **spec.trainer_settings()).fit(
        finetuner, datamodule=ctx.dm
    )
    model = plain_model(load_file(folder / "best.ckpt"))
    record = ctx.evaluate(spec, model, cell.seed)
    x_test, y_test = ctx.test_tensors()
    mask_model = plain_model(load_file(search["checkpoint"]))
    mask_test = robust_accuracy(
        mask_model, x_test, y_test, ctx.threat, steps=spec.eval_pgd_steps, seed=cell.seed
    )
    row = ResultRow.from_record(
        record,
        seed=cell.seed,
        base_method=cell.base_method,
        variant=cell.variant,
        sparsity=cell.sparsity,
        gamma=gamma if cell.variant == "s2ap" else None,
        finetune=cell.arm_of(spec),
        stage="finetune",
        val_mask_pgd_acc=searched.val_mask_pgd_acc,
        n_val=searched.n_val,
        mask_pgd_acc=mask_test,
        mask_hamming_last_epoch=searched.mask_hamming_last_epoch,
        lambda_max=searched.lambda_max,
        sharpness=searched.sharpness,
        global_sparsity=sparsity_table(model)[1],
        checkpoint=str(folder / "best.ckpt"),
        search_checkpoint=search["checkpoint"],
        **ctx.what,
    )
    extras = {
        "search_cell": search["cell"],
        "init_sha256": search["init_sha256"],
        "gamma_val_scores": {str(g): v for g, v in scores.items()},
    }
    return row, extras


def study_rows(spec: StudySpec) -> list[ResultRow]:
    """One row per run of a finished study: the dense model of each seed, then every search.

    The searches that were finetuned (``selected``) carry their finetuned model's test figures, one
    row per finetuning arm (the search's wall time is counted in each of them).
    """
    pretrain, search, finetune = cells_of(spec)
    rows = [ResultRow.from_dict(_finished(spec, cell)) for cell in pretrain]
    finals: dict[str, list[dict[str, Any]]] = {}  # search cell -> its finetunings, one per arm
    for cell in finetune:
        result = _finished(spec, cell)
        # Cells of versions before the arms named none: the spec's awp flag says which arm they ran.
        result = {**result, "finetune": result.get("finetune") or cell.arm_of(spec)}
        finals.setdefault(result["search_cell"], []).append(result)
    for cell in search:
        result = _finished(spec, cell)
        if result["cell"] not in finals:
            rows.append(replace(ResultRow.from_dict(result), selected=False))
        for final in finals.get(result["cell"], []):
            # The finetuned model's row; what its record lacks (older versions) comes from its search.
            row = ResultRow.from_dict({**result, **{k: v for k, v in final.items() if v is not None}})
            wall = round(float(result.get("wall_s") or 0) + float(final.get("wall_s") or 0), 1)
            search_ckpt = row.search_checkpoint or result.get("checkpoint")
            rows.append(replace(row, selected=True, wall_s=wall, search_checkpoint=search_ckpt))
    return rows


def _finished(spec: StudySpec, cell: Cell) -> dict[str, Any]:
    result = read_result(spec, cell)
    if result is None:
        raise FileNotFoundError(f"cell {cell.key} has not finished: no {result_path(spec, cell)}")
    return result
