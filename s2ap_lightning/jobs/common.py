"""What the jobs share: a quiet deterministic Trainer per stage, and the figures of a record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from s2ap_lightning.checkpoint import AtomicCheckpointIO
from s2ap_lightning.stages.callbacks import checkpoint_callbacks


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


def record_figures(record: Any) -> dict[str, Any]:
    """What a job's table keeps of an evaluation record (``evaluation.EvalRecord``)."""
    return {
        "clean_acc": record.clean_acc,
        "pgd_acc": record.pgd_acc,
        "aa_acc": record.aa_acc,
        "n_test": record.n_images,
        "n_aa": record.n_aa_images,
        "checks_passed": record.passed,
        "check_failures": record.failures(),
        "autoattack": record.autoattack,
    }
