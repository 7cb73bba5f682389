"""What the jobs share: a quiet deterministic Trainer, and the ONE place each stage and evaluation is built.

Every stage a job trains is built by :func:`stage_module`, every threat model by :func:`threat_of`,
every protocol evaluation by :func:`evaluation_of` and every quick PGD figure by
:func:`robust_accuracy`: when the stages' or the evaluation's interface changes, these functions
change and the jobs do not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from s2ap_lightning.analysis.report import threat_text
from s2ap_lightning.attacks.pgd import AttackConfig
from s2ap_lightning.checkpoint import AtomicCheckpointIO
from s2ap_lightning.evaluation import EvalProtocol, EvalRecord, evaluate, pgd_accuracy
from s2ap_lightning.stages import MaskedFinetuner, RobustPretrainer, RobustTask, ScoreSpaceSAMPruner
from s2ap_lightning.stages.callbacks import checkpoint_callbacks

#: The stage classes' own defaults of the threat model, for settings that leave it out.
DEFAULT_THREAT = {"eps": 8 / 255, "step_size": 2 / 255, "attack_steps": 10, "norm": "linf"}


def stage_trainer(
    root: Path,
    epochs: int,
    progress: bool,
    callbacks: list[L.Callback] | None = None,
    accelerator: str = "cpu",
    precision: str = "32-true",
) -> L.Trainer:
    """A one-device deterministic Trainer writing logs and ``best.ckpt``/``last.ckpt`` under ``root``."""
    return L.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        precision=precision,
        devices=1,
        logger=CSVLogger(root, name="logs"),
        callbacks=[*checkpoint_callbacks(str(root)), *(callbacks or [])],
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=5,
        deterministic=True,
        plugins=[AtomicCheckpointIO()],
    )


def threat_of(settings: Mapping[str, Any]) -> AttackConfig:
    """The threat model of a job's stage settings (``eps``, ``step_size``, ``attack_steps``, ``norm``).

    ``steps`` are the training attack's; evaluations and quick figures set their own.
    """
    get = {**DEFAULT_THREAT, **{k: v for k, v in settings.items() if k in DEFAULT_THREAT}}
    return AttackConfig(
        float(get["eps"]), float(get["step_size"]), int(get["attack_steps"]), str(get["norm"])
    )


def describe_threat(threat: AttackConfig) -> str:
    """How result rows and report headings name a threat model (``linf eps 0.1``)."""
    return threat_text(threat.norm, threat.eps)


def stage_module(
    kind: str,
    settings: Mapping[str, Any],
    *,
    lr: float,
    init_from: str | None = None,
    sparsity: float = 0.9,
    gamma: float = 0.0,
    base_method: str = "hydra",
    warmup_epochs: int = 0,
    awp_gamma: float = 0.0,
) -> RobustTask:
    """The stage module of a job's ``pretrain``, ``search`` or ``finetune`` step.

    Args:
        kind: ``pretrain`` (robust pretraining), ``search`` (mask search, S2AP when ``gamma > 0``) or
            ``finetune`` (masked finetuning, AWP when ``awp_gamma > 0``).
        settings: model, data-derived sizes, threat model and speed options (flat stage arguments).
        lr: SGD learning rate of the stage.
        init_from: checkpoint the stage starts from (search: pretrained; finetune: searched).
        sparsity: pruned fraction of the search.
        gamma: S2AP's score-space radius of the search (0: the base method alone).
        base_method: the search's score-based method.
        warmup_epochs: base-method epochs before S2AP starts.
        awp_gamma: AWP's relative radius of the finetuning (0: plain adversarial finetuning).

    """
    if kind == "pretrain":
        return RobustPretrainer(lr=lr, **settings)
    if kind == "search":
        return ScoreSpaceSAMPruner(
            sparsity=sparsity,
            gamma=gamma,
            base_method=base_method,
            warmup_epochs=warmup_epochs,
            init_from=init_from,
            lr=lr,
            **settings,
        )
    if kind == "finetune":
        return MaskedFinetuner(init_from=init_from, lr=lr, awp_gamma=awp_gamma, **settings)
    raise ValueError(f"stage kind={kind!r} is unknown; valid: pretrain, search, finetune")


def evaluation_of(
    model: nn.Module, x: Tensor, y: Tensor, threat: AttackConfig, *, pgd_steps: int, aa_images: int, seed: int
) -> EvalRecord:
    """The evaluation protocol on a job's test images: clean, PGD, AutoAttack sample, masking checks.

    Args:
        model: the plain network to evaluate.
        x: test images.
        y: their labels.
        threat: the threat model (its ``steps`` are not used: ``pgd_steps`` are the evaluation's).
        pgd_steps: steps of the final PGD.
        aa_images: images of the class-stratified AutoAttack sample (0 skips AutoAttack).
        seed: seed of the AutoAttack sample and the attacks' random starts.

    """
    protocol = EvalProtocol(
        threat.eps, threat.step_size, threat.norm, pgd_steps, 1, aa_images, subset_seed=seed
    )
    return evaluate(model.eval(), x, y, protocol)


def robust_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, threat: AttackConfig, *, steps: int, seed: int
) -> float:
    """Accuracy under one seeded PGD of ``steps`` steps: gamma selection, the mask before finetuning.

    Not the protocol (no AutoAttack, no checks); the caller's random state is left as it was.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return pgd_accuracy(model.eval(), x, y, replace(threat, steps=steps))
