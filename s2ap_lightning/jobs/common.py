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
from s2ap_lightning.attacks.pgd import ThreatModel
from s2ap_lightning.checkpoint import AtomicCheckpointIO
from s2ap_lightning.evaluation import EvalProtocol, EvalRecord, evaluate, pgd_accuracy
from s2ap_lightning.pruning.methods import method_from_config
from s2ap_lightning.stages import MaskedFinetuner, RobustPretrainer, RobustTask, ScoreSpaceSAMPruner
from s2ap_lightning.stages.callbacks import checkpoint_callbacks
from s2ap_lightning.stages.hparams import as_block


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


def threat_of(settings: Mapping[str, Any]) -> ThreatModel:
    """The threat model of a job's stage settings (their ``threat`` block; the class default without).

    ``steps`` are the training attack's; evaluations and quick figures set their own.
    """
    return as_block(ThreatModel, settings.get("threat") or {})


def describe_threat(threat: ThreatModel) -> str:
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
    base_method: str | Mapping[str, Any] = "hydra",
    warmup_epochs: int = 0,
    awp_gamma: float = 0.0,
) -> RobustTask:
    """The stage module of a job's ``pretrain``, ``search`` or ``finetune`` step.

    Args:
        kind: ``pretrain`` (robust pretraining), ``search`` (mask search, S2AP when ``gamma > 0``) or
            ``finetune`` (masked finetuning, AWP when ``awp_gamma > 0``).
        settings: model, data-derived sizes, the ``threat`` block and speed options (stage arguments).
        lr: SGD learning rate of the stage.
        init_from: checkpoint the stage starts from (search: pretrained; finetune: searched).
        sparsity: pruned fraction of the search.
        gamma: S2AP's score-space radius of the search (0: the base method alone).
        base_method: the search's score-based method: a registered name (``hydra``, with its
            default options) or ``{"class_path": name, "init_args": {option: value}}``.
        warmup_epochs: base-method epochs before S2AP starts.
        awp_gamma: AWP's relative radius of the finetuning (0: plain adversarial finetuning).

    """
    if kind == "pretrain":
        return RobustPretrainer(lr=lr, **settings)
    if kind == "search":
        return ScoreSpaceSAMPruner(
            sparsity=sparsity,
            gamma=gamma,
            method=method_from_config(base_method),
            warmup_epochs=warmup_epochs,
            init_from=init_from,
            lr=lr,
            **settings,
        )
    if kind == "finetune":
        return MaskedFinetuner(init_from=init_from, lr=lr, awp_gamma=awp_gamma, **settings)
    raise ValueError(f"stage kind={kind!r} is unknown; valid: pretrain, search, finetune")


def evaluation_of(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    pgd_steps: int,
    aa_images: int,
    seed: int,
    collapse_margin: float = EvalProtocol.collapse_margin,
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
        collapse_margin: clean accuracy this close to the majority-class rate marks the model
            collapsed (see :class:`~s2ap_lightning.evaluation.EvalProtocol`).

    """
    protocol = EvalProtocol(
        pgd_steps=pgd_steps, aa_images=aa_images, seed=seed, collapse_margin=collapse_margin
    )
    return evaluate(model.eval(), (x, y), threat, protocol)


def robust_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *, steps: int, seed: int
) -> float:
    """Accuracy under one seeded PGD of ``steps`` steps: gamma selection, the mask before finetuning.

    Not the protocol (no AutoAttack, no checks); the caller's random state is left as it was.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return pgd_accuracy(model.eval(), x, y, replace(threat, steps=steps))
