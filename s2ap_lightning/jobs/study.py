"""``s2ap study``: does S2AP help? A paired, multi-seed comparison with the base method.

Fairness rules, enforced by how the grid is built:

* **Shared pretraining.** Per seed, ONE robust pretraining; every mask search of that seed (the base
  method and S2AP at every gamma) starts from it. Each search records the hash of the weights it
  started from, so the pairing can be checked.
* **Gamma on validation.** Per (seed, base method, sparsity) the S2AP gamma is the one whose searched
  mask has the best PGD accuracy on the validation split (``w_pretrained * M(s*)``); test data is
  never read before a gamma is chosen.
* **Identical finetuning.** The base method's mask and the chosen S2AP mask are finetuned with the same
  recipe (AWP on for both or off for both), the same epochs, learning rate and seed.
* **One evaluation protocol.** Finetuned models are evaluated by :mod:`s2ap_lightning.evaluation`
  (clean, PGD, AutoAttack on a class-stratified sample, gradient-masking checks).

The grid is a set of *cells* (pretrain, search, finetune), each writing one JSON file when it has
finished. A killed study resumes: finished cells are skipped, a half-written cell is redone from
scratch. ``--launcher slurm`` submits one job per cell through submitit, with SLURM dependencies
pretrain -> search -> finetune; ``local`` runs the cells in order in this process.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from s2ap_lightning.analysis.sharpness import score_space_sharpness
from s2ap_lightning.attacks.pgd import AttackConfig
from s2ap_lightning.checkpoint import load_file, model_state_dict
from s2ap_lightning.data import RobustDataModule, split_tensors
from s2ap_lightning.evaluation import EvalProtocol, evaluate, pgd_accuracy, write_record
from s2ap_lightning.evaluation.record import git_commit
from s2ap_lightning.export import plain_model
from s2ap_lightning.jobs.common import record_figures, stage_trainer
from s2ap_lightning.pruning.methods import BASE_METHODS
from s2ap_lightning.stages import MaskedFinetuner, RobustPretrainer, ScoreSpaceSAMPruner
from s2ap_lightning.stages.callbacks import MaskStabilityCallback
from s2ap_lightning.stages.training import ATTACK_PRECISIONS

LAUNCHERS = ("local", "slurm", "submitit_local")


@dataclass
class StudySpec:
    """A study: the data and threat model, the grid, the epochs of each stage, how to run it.

    Args:
        name: the study's name (also the default folder under ``results/``).
        data_config: a ``configs/data/*.yaml`` file: its ``data`` block builds the DataModule and its
            ``model.init_args`` give the model and threat model (``eps``, ``step_size``, ...).
        out: study folder (default ``results/<name>``).
        base_methods: ``hydra`` and/or ``harp``.
        sparsities: pruned fractions.
        gammas: S2AP's score-space radii; one search per gamma, the best on validation is kept.
        seeds: one robust pretraining per seed, shared by every method of that seed.
        pretrain_epochs: epochs of robust pretraining.
        prune_epochs: epochs of every mask search.
        warmup_epochs: plain base-method epochs before S2AP starts (the same for every gamma).
        finetune_epochs: epochs of finetuning (the same for every method).
        pretrain_lr: SGD learning rate of pretraining.
        prune_lr: SGD learning rate of the scores.
        finetune_lr: SGD learning rate of finetuning.
        awp: finetune every method with AWP (``awp_gamma``), or none of them.
        awp_gamma: AWP's relative weight-perturbation radius, when ``awp`` is on.
        select_pgd_steps: PGD steps of the validation accuracy that chooses gamma.
        eval_pgd_steps: PGD steps of the test evaluation (the weaker check attack runs 10).
        aa_images: test images attacked by AutoAttack (class-stratified, seeded; 0 skips it).
        sharpness_images: validation images of lambda_max, the top Hessian eigenvalue of the robust
            loss w.r.t. the scores after the search (0 skips it).
        sharpness_iters: power iterations of lambda_max.
        threads: torch CPU threads (0: torch's default).
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
    data_config: str = "configs/data/digits.yaml"
    out: str | None = None
    base_methods: list[str] = field(default_factory=lambda: ["hydra"])
    sparsities: list[float] = field(default_factory=lambda: [0.9, 0.99])
    gammas: list[float] = field(default_factory=lambda: [0.001, 0.005, 0.05])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    pretrain_epochs: int = 20
    prune_epochs: int = 10
    warmup_epochs: int = 2
    finetune_epochs: int = 8
    pretrain_lr: float = 0.1
    prune_lr: float = 0.1
    finetune_lr: float = 0.01
    awp: bool = False
    awp_gamma: float = 0.005
    select_pgd_steps: int = 20
    eval_pgd_steps: int = 20
    aa_images: int = 200
    sharpness_images: int = 256
    sharpness_iters: int = 20
    threads: int = 0
    accelerator: str = "cpu"
    precision: str = "32-true"
    attack_precision: str = "fp32"
    compile: bool = False
    progress: bool = False
    launcher: str = "local"
    slurm: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [m for m in self.base_methods if m not in BASE_METHODS]
        if bad or not self.base_methods:
            raise ValueError(f"base_methods={self.base_methods!r}: valid are {', '.join(BASE_METHODS)}")
        for s in self.sparsities:
            if not 0.0 < s < 1.0:
                raise ValueError(f"sparsities: {s} is out of range: valid range is (0.0, 1.0)")
        if self.attack_precision not in ATTACK_PRECISIONS:
            valid = ", ".join(ATTACK_PRECISIONS)
            raise ValueError(f"attack_precision={self.attack_precision!r} is unknown; valid: {valid}")
        if not self.gammas or any(g <= 0 for g in self.gammas):
            raise ValueError(
                f"gammas={self.gammas!r}: give at least one gamma, each > 0 (gamma 0 is the base)"
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds!r}: give distinct seeds")
        for name in (
            "pretrain_epochs",
            "prune_epochs",
            "finetune_epochs",
            "select_pgd_steps",
            "eval_pgd_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.warmup_epochs < self.prune_epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} must lie in [0, prune_epochs={self.prune_epochs})"
            )
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher={self.launcher!r} is unknown; valid: {', '.join(LAUNCHERS)}")
        if not Path(self.data_config).is_file():
            raise FileNotFoundError(f"data_config={self.data_config!r} does not exist (see configs/data/)")

    @property
    def folder(self) -> Path:
        return Path(self.out or f"results/{self.name}")

    def trainer_settings(self) -> dict[str, str]:
        """The Trainer options every stage of the study shares."""
        return {"accelerator": self.accelerator, "precision": self.precision}

    def data_settings(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(DataModule kwargs, model kwargs)`` from the data config."""
        config = yaml.safe_load(Path(self.data_config).read_text()) or {}
        data = dict(config.get("data") or {})
        data = dict(data.get("init_args", data))
        model = dict(config.get("model") or {})
        model = dict(model.get("init_args", model))  # the data configs' form, or a flat block
        model.pop("class_path", None)
        return data, model


# ----------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """One unit of work; ``key`` is its folder and JSON name inside the study folder."""

    kind: str  # pretrain | search | finetune
    seed: int
    base_method: str = ""
    sparsity: float = 0.0
    gamma: float = 0.0  # search: its gamma; finetune: 0 = base method, 1 = S2AP (gamma chosen at run time)

    @property
    def s2ap(self) -> bool:
        return self.gamma > 0

    @property
    def key(self) -> str:
        if self.kind == "pretrain":
            return f"seed{self.seed}/pretrain"
        tag = f"{self.base_method}_sp{self.sparsity:g}"
        if self.kind == "search":
            return f"seed{self.seed}/search/{tag}_g{self.gamma:g}"
        return f"seed{self.seed}/finetune/{tag}_{'s2ap' if self.s2ap else 'base'}"


def cells_of(spec: StudySpec) -> list[list[Cell]]:
    """The grid in dependency waves: pretraining, then mask searches, then finetuning."""
    pretrain = [Cell("pretrain", s) for s in spec.seeds]
    grid = [(s, m, sp) for s in spec.seeds for m in spec.base_methods for sp in spec.sparsities]
    search = [Cell("search", s, m, sp, g) for s, m, sp in grid for g in [0.0, *spec.gammas]]
    finetune = [Cell("finetune", s, m, sp, g) for s, m, sp in grid for g in (0.0, 1.0)]
    return [pretrain, search, finetune]


def depends_on(cell: Cell, spec: StudySpec) -> list[Cell]:
    if cell.kind == "search":
        return [Cell("pretrain", cell.seed)]
    if cell.kind == "finetune":
        gammas = list(spec.gammas) if cell.s2ap else [0.0]
        return [Cell("search", cell.seed, cell.base_method, cell.sparsity, g) for g in gammas]
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


class _Context:
    """Data, threat model and fixed evaluation tensors of a study, built once per process."""

    def __init__(self, spec: StudySpec) -> None:
        data_kw, model_kw = spec.data_settings()
        self.dm = RobustDataModule(**data_kw)
        self.dm.setup()
        self.common = {
            **model_kw,
            "num_classes": self.dm.num_classes,
            "in_channels": self.dm.in_channels,
            "image_size": self.dm.image_size,
            "attack_precision": spec.attack_precision,
            "compile": spec.compile,
        }
        self.x_val, self.y_val = split_tensors(self.dm.val_set)
        self.eps = float(self.common.get("eps", 8 / 255))
        self.step_size = float(self.common.get("step_size", 2 / 255))
        self.norm = str(self.common.get("norm", "linf"))
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None

    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Read by the pretrain and finetune cells only (never by a search, so never by selection);
        # built once per process.
        if self._test is None:
            self._test = split_tensors(self.dm.test_set)
        return self._test

    def protocol(self, spec: StudySpec, seed: int) -> EvalProtocol:
        return EvalProtocol(
            self.eps, self.step_size, self.norm, spec.eval_pgd_steps, 1, spec.aa_images, subset_seed=seed
        )


def _fresh(folder: Path) -> Path:
    # A half-written cell (killed mid-way) is redone from scratch: its folder never mixes two runs.
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def run_cell(spec: StudySpec, cell: Cell, ctx: _Context | None = None) -> dict[str, Any]:
    """Run one cell (unless its result exists) and write its JSON result; return the result."""
    done = read_result(spec, cell)
    if done is not None:
        return done
    for dep in depends_on(cell, spec):
        if read_result(spec, dep) is None:
            raise RuntimeError(f"cell {cell.key} needs {dep.key}, which has not finished")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    ctx = ctx or _Context(spec)
    started = time.time()
    folder = _fresh(spec.folder / "runs" / cell.key)
    result = {"pretrain": _pretrain, "search": _search, "finetune": _finetune}[cell.kind](
        spec, cell, ctx, folder
    )
    result.update(
        cell=cell.key,
        kind=cell.kind,
        seed=cell.seed,
        wall_s=round(time.time() - started, 1),
        git_commit=git_commit(),
    )
    write_record(result_path(spec, cell), result)
    return result


def _pretrain(spec: StudySpec, cell: Cell, ctx: _Context, folder: Path) -> dict[str, Any]:
    L.seed_everything(cell.seed, verbose=False)
    module = RobustPretrainer(lr=spec.pretrain_lr, **ctx.common)
    stage_trainer(folder, spec.pretrain_epochs, spec.progress, **spec.trainer_settings()).fit(
        module, datamodule=ctx.dm
    )
    ckpt = folder / "best.ckpt"
    model = plain_model(load_file(ckpt)).eval()
    x_test, y_test = ctx.test_tensors()
    record = evaluate(model, x_test, y_test, ctx.protocol(spec, cell.seed))
    return {
        "checkpoint": str(ckpt),
        "weights_sha256": weights_hash(ckpt),
        "method": "dense",
        "base_method": "",
        "sparsity": 0.0,
        "gamma": None,
        **record_figures(record),
    }


def _search(spec: StudySpec, cell: Cell, ctx: _Context, folder: Path) -> dict[str, Any]:
    pretrain = read_result(spec, Cell("pretrain", cell.seed))
    pretrained = pretrain["checkpoint"]
    L.seed_everything(cell.seed, verbose=False)
    stability = MaskStabilityCallback(dirpath=str(folder / "masks"))
    pruner = ScoreSpaceSAMPruner(
        sparsity=cell.sparsity,
        gamma=cell.gamma,
        base_method=cell.base_method,
        warmup_epochs=spec.warmup_epochs if cell.gamma else 0,
        init_from=pretrained,
        lr=spec.prune_lr,
        **ctx.common,
    )
    stage_trainer(folder, spec.prune_epochs, spec.progress, [stability], **spec.trainer_settings()).fit(
        pruner, datamodule=ctx.dm
    )
    ckpt = folder / "best.ckpt"
    masked = plain_model(load_file(ckpt)).eval()
    select = AttackConfig(ctx.eps, ctx.step_size, spec.select_pgd_steps, ctx.norm)
    with torch.random.fork_rng():
        torch.manual_seed(cell.seed)
        val_acc = pgd_accuracy(masked, ctx.x_val, ctx.y_val, select)
    lambda_max = None
    if spec.sharpness_images:
        best = ScoreSpaceSAMPruner.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
        n = min(spec.sharpness_images, len(ctx.x_val))
        sharp = score_space_sharpness(
            best.objective(),
            ctx.x_val[:n],
            ctx.y_val[:n],
            gamma=max(cell.gamma, 0.01),
            max_iter=spec.sharpness_iters,
            seed=cell.seed,
        )
        lambda_max = sharp.lambda_max
    history = stability.history
    return {
        "checkpoint": str(ckpt),
        # Hashed from the file this search started from, not copied from the pretrain cell's record:
        # a pretrain checkpoint replaced after its cell finished would show as a broken pairing.
        "init_sha256": weights_hash(pretrained),
        "method": f"{cell.base_method}+s2ap" if cell.gamma else cell.base_method,
        "base_method": cell.base_method,
        "sparsity": cell.sparsity,
        "gamma": cell.gamma,
        "val_mask_pgd_acc": val_acc,
        "n_val": len(ctx.x_val),
        "mask_hamming_last_epoch": history[-1]["hamming"] if history else None,
        "lambda_max": lambda_max,
    }


def choose_gamma(
    spec: StudySpec, seed: int, base_method: str, sparsity: float
) -> tuple[float, dict[float, float]]:
    """The gamma whose searched mask has the best validation PGD accuracy (ties: the smaller gamma).

    Reads only the search cells' validation figures: test data never enters the choice.
    """
    scores = {}
    for g in spec.gammas:
        result = read_result(spec, Cell("search", seed, base_method, sparsity, g))
        scores[g] = float(result["val_mask_pgd_acc"])
    best = max(sorted(scores), key=lambda g: scores[g])
    return best, scores


def _finetune(spec: StudySpec, cell: Cell, ctx: _Context, folder: Path) -> dict[str, Any]:
    gamma, scores = 0.0, {}
    if cell.s2ap:
        gamma, scores = choose_gamma(spec, cell.seed, cell.base_method, cell.sparsity)
    search = read_result(spec, Cell("search", cell.seed, cell.base_method, cell.sparsity, gamma))
    L.seed_everything(cell.seed, verbose=False)
    finetuner = MaskedFinetuner(
        init_from=search["checkpoint"],
        lr=spec.finetune_lr,
        awp_gamma=spec.awp_gamma if spec.awp else 0.0,
        **ctx.common,
    )
    stage_trainer(folder, spec.finetune_epochs, spec.progress, **spec.trainer_settings()).fit(
        finetuner, datamodule=ctx.dm
    )
    model = plain_model(load_file(folder / "best.ckpt")).eval()
    x_test, y_test = ctx.test_tensors()
    record = evaluate(model, x_test, y_test, ctx.protocol(spec, cell.seed))
    mask_model = plain_model(load_file(search["checkpoint"])).eval()
    with torch.random.fork_rng():
        torch.manual_seed(cell.seed)
        mask_test = pgd_accuracy(
            mask_model,
            x_test,
            y_test,
            AttackConfig(ctx.eps, ctx.step_size, spec.eval_pgd_steps, ctx.norm),
        )
    return {
        "checkpoint": str(folder / "best.ckpt"),
        "search_cell": search["cell"],
        "init_sha256": search["init_sha256"],
        "method": search["method"],
        "base_method": cell.base_method,
        "sparsity": cell.sparsity,
        "gamma": gamma,
        "gamma_val_scores": {str(g): v for g, v in scores.items()},
        "val_mask_pgd_acc": search["val_mask_pgd_acc"],
        "mask_pgd_acc": mask_test,
        "mask_hamming_last_epoch": search["mask_hamming_last_epoch"],
        "lambda_max": search["lambda_max"],
        "awp": spec.awp,
        **record_figures(record),
    }


# ----------------------------------------------------------------------------- launchers
def _eta(durations: dict[str, list[float]], cells: list[Cell]) -> float | None:
    """Seconds left for ``cells``, from the mean wall time of the finished cells of each kind.

    A kind that has not run yet counts at the mean of all kinds; None before any cell has finished.
    """
    known = [d for v in durations.values() for d in v]
    if not known:
        return None
    fallback = sum(known) / len(known)
    mean = {k: sum(v) / len(v) for k, v in durations.items()}
    return sum(mean.get(c.kind, fallback) for c in cells)


def run_local(spec: StudySpec) -> None:
    """Every cell in order in this process; finished cells are skipped (resume)."""
    todo = [c for wave in cells_of(spec) for c in wave]
    pending = [c for c in todo if read_result(spec, c) is None]
    print(f"study {spec.name}: {len(todo)} cells, {len(todo) - len(pending)} already finished", flush=True)
    ctx = _Context(spec) if pending else None
    started, durations = time.time(), {}
    for i, cell in enumerate(pending):
        eta = _eta(durations, pending[i:])
        eta_text = "" if eta is None else f", about {eta / 60:.0f} min left"
        elapsed = (time.time() - started) / 60
        print(f"[cell {i + 1}/{len(pending)}] {cell.key}  (elapsed {elapsed:.1f} min{eta_text})", flush=True)
        result = run_cell(spec, cell, ctx)
        durations.setdefault(cell.kind, []).append(float(result["wall_s"]))


def _cell_job(spec_dict: dict[str, Any], cell_dict: dict[str, Any]) -> str:
    spec = StudySpec(**spec_dict)
    run_cell(spec, Cell(**cell_dict))
    return Cell(**cell_dict).key


#: SLURM job states in which a submitted cell is still on its way (not to be submitted again).
ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
     "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}
)  # fmt: skip


def check_slurm(spec: StudySpec) -> None:
    """The cluster settings of a spec, checked before anything is submitted (one-line errors)."""
    if shutil.which("sbatch") is None:
        raise FileNotFoundError("launcher=slurm, but no `sbatch` is on PATH: run on a SLURM login node")
    partition = spec.slurm.get("slurm_partition") or spec.slurm.get("partition")
    if partition:
        known = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True).stdout.split()
        if partition not in known:
            raise ValueError(
                f"slurm.slurm_partition={partition!r} does not exist; "
                f"partitions: {', '.join(known) or 'none'}"
            )
    gpus = spec.slurm.get("gpus_per_node") or spec.slurm.get("slurm_gpus_per_node") or 0
    if spec.accelerator in ("gpu", "cuda") and not gpus:
        raise ValueError(
            f"accelerator={spec.accelerator!r} needs one GPU per cell, but slurm: grants none "
            "(set slurm.gpus_per_node: 1, or accelerator: cpu)"
        )


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM's state of each of ``job_ids`` that it still has queued or running (one ``squeue``)."""
    if not job_ids:
        return {}
    listed = subprocess.run(
        ["squeue", "--me", "-h", "-o", "%i %T"], capture_output=True, text=True, check=True
    )
    states = dict(line.split()[:2] for line in listed.stdout.splitlines() if line.strip())
    return {j: states[j] for j in job_ids if states.get(j) in ACTIVE_STATES}


#: The line of a cell's log that says why it failed (the last exception raised).
ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b")


class SubmittedJobs:
    """The study's record of which SLURM job runs which cell (``submitit/jobs.json``).

    A second ``s2ap study`` while cells are queued or running asks SLURM about these ids and submits
    nothing twice (a duplicate would wipe its original's folder); a cell whose job is gone without a
    result is named with its log, then submitted again.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / "jobs.json"
        self.folder = folder
        self.jobs: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def record(self, cell: Cell, job_id: str) -> None:
        self.jobs[cell.key] = job_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.jobs, indent=1))
        tmp.replace(self.path)

    def log_of(self, job_id: str) -> Path:
        return self.folder / f"{job_id}_0_log.err"

    def report_lost(self, cell: Cell, job_id: str) -> None:
        log = self.log_of(job_id)
        if log.is_file():
            errors = [line for line in log.read_text(errors="replace").splitlines() if ERROR_LINE.match(line)]
            reason = f" ({errors[-1].strip()})" if errors else ""
            print(f"cell {cell.key}: job {job_id} ended without a result{reason}; log: {log}")
        else:
            print(
                f"cell {cell.key}: job {job_id} ended without a result and wrote no log (cancelled before "
                "it ran, e.g. because a cell it depends on failed)"
            )


def run_submitit(spec: StudySpec, executor: Any = None) -> None:
    """One submitit job per unfinished cell, dependencies respected.

    On SLURM the dependencies are SLURM's own (``afterok`` with ``kill-on-invalid-dep``: when a cell
    fails, SLURM cancels the cells that depend on it instead of leaving them pending forever), so this
    returns once everything is queued; cells already queued or running are not submitted again. With
    submitit's local executor (no dependency support) each wave is awaited before the next.
    """
    import submitit  # only the SLURM/submitit launchers need submitit

    folder = spec.folder / "submitit"
    if executor is None:
        if spec.launcher == "submitit_local":
            executor = submitit.LocalExecutor(folder=folder)
        else:
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
            executor.update_parameters(**spec.slurm)
    on_slurm = not isinstance(executor, submitit.LocalExecutor)
    submitted = SubmittedJobs(folder)
    alive = slurm_states(list(submitted.jobs.values())) if on_slurm else {}
    pending_ids: dict[str, str] = {}  # cell key -> job id of every unfinished cell queued now
    for wave in cells_of(spec):
        wave_jobs = []
        for cell in wave:
            if read_result(spec, cell) is not None:
                continue
            previous = submitted.jobs.get(cell.key)
            if previous in alive:
                pending_ids[cell.key] = previous
                print(f"cell {cell.key} is already queued as job {previous} ({alive[previous]})", flush=True)
                continue
            if previous is not None and on_slurm:
                submitted.report_lost(cell, previous)
            deps = [pending_ids[d.key] for d in depends_on(cell, spec) if d.key in pending_ids]
            if on_slurm:
                extra = dict(spec.slurm.get("slurm_additional_parameters") or {})
                if deps:
                    extra["dependency"] = "afterok:" + ":".join(deps)
                    extra["kill-on-invalid-dep"] = "yes"
                executor.update_parameters(slurm_additional_parameters=extra, name=cell.key.replace("/", "_"))
            job = executor.submit(_cell_job, asdict(spec), asdict(cell))
            pending_ids[cell.key] = str(job.job_id)
            if on_slurm:
                submitted.record(cell, str(job.job_id))
            wave_jobs.append(job)
            print(f"submitted {cell.key} as job {job.job_id}", flush=True)
        if not on_slurm:
            for job in wave_jobs:
                job.result()  # raises if the cell failed


def run_study(spec: StudySpec) -> Path | None:
    """Run (or resume) a study; write ``study.csv``, ``study.md`` and plots when every cell is done."""
    from s2ap_lightning.jobs.study_report import write_study_report  # it imports this module

    if spec.launcher == "slurm":
        check_slurm(spec)  # before the spec is written or anything submitted
    spec.folder.mkdir(parents=True, exist_ok=True)
    (spec.folder / "spec.yaml").write_text(yaml.safe_dump(asdict(spec), sort_keys=False))
    if spec.launcher == "local":
        run_local(spec)
    else:
        run_submitit(spec)
    if all(read_result(spec, c) is not None for wave in cells_of(spec) for c in wave):
        path = write_study_report(spec)
        print(f"study written to {path}")
        return path
    print(
        f"cells queued; when they have finished, run the same command again to write {spec.folder}/study.md"
    )
    return None


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import ActionConfigFile, ArgumentParser  # imported when the command runs

    parser = ArgumentParser(prog="s2ap study", description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a study spec (configs/study/*.yaml)")
    parser.add_class_arguments(StudySpec, as_group=False)
    cfg = parser.parse_args(argv)
    kwargs = {k: v for k, v in cfg.as_dict().items() if k != "config" and k in StudySpec.__dataclass_fields__}
    run_study(StudySpec(**kwargs))
    return 0
