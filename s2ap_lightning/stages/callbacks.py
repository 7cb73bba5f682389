"""Checkpoint callbacks every stage uses: the best by validation robust accuracy, and the last.

Two callbacks rather than ``save_last=True``: since Lightning 2.6, ``save_last`` only writes when the
monitored checkpoint was written in the same step, so a run whose robust accuracy stopped improving
would resume from a stale "last" checkpoint.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

BEST = dict(
    filename="best",
    monitor="val/robust_acc",
    mode="max",
    save_top_k=1,
    save_last=False,
    enable_version_counter=False,
)
LAST = dict(filename="last", monitor=None, save_top_k=1, save_last=False, enable_version_counter=False)


class BestCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that only considers models within their stage's budget.

    A stage that can be over budget (HARP's learnt density) says so through ``within_budget()``; an
    over-budget epoch is neither saved nor compared, as in HARP's own model selection, so the best
    checkpoint never holds a larger mask than asked for. Stages without that method are always in.
    """

    @staticmethod
    def _eligible(pl_module: L.LightningModule) -> bool:
        check = getattr(pl_module, "within_budget", None)
        return check is None or bool(check())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._eligible(pl_module):
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._eligible(pl_module):
            super().on_validation_end(trainer, pl_module)


def checkpoint_callbacks(
    dirpath: str | None = None, every_n_train_steps: int | None = None
) -> list[ModelCheckpoint]:
    """``best.ckpt`` (validation robust accuracy, never test) and ``last.ckpt`` (for resume)."""
    return [
        BestCheckpoint(dirpath=dirpath, **BEST),
        ModelCheckpoint(dirpath=dirpath, every_n_train_steps=every_n_train_steps, **LAST),
    ]


class EpochSummary(L.Callback):
    """One line per epoch when the progress bar is off (batch jobs, SLURM logs, `progress: false`).

    Without a bar a run would otherwise print nothing between start and end; with one, this is silent.
    """

    KEYS = ("train/loss", "train/robust_acc", "val/clean_acc", "val/robust_acc", "prune/density")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.progress_bar_callback is not None or not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        shown = "  ".join(f"{k} {float(metrics[k]):.4f}" for k in self.KEYS if k in metrics)
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        print(f"{type(pl_module).__name__} epoch {trainer.current_epoch + 1}/{total}  {shown}", flush=True)
