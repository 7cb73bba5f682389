"""Checkpoint callbacks every stage uses: the best by validation robust accuracy, and the last.

Two callbacks rather than ``save_last=True``: since Lightning 2.6, ``save_last`` only writes when the
monitored checkpoint was written in the same step, so a run whose robust accuracy stopped improving
would resume from a stale "last" checkpoint.
"""

from __future__ import annotations

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


def checkpoint_callbacks(
    dirpath: str | None = None, every_n_train_steps: int | None = None
) -> list[ModelCheckpoint]:
    """``best.ckpt`` (validation robust accuracy, never test) and ``last.ckpt`` (for resume)."""
    return [
        ModelCheckpoint(dirpath=dirpath, **BEST),
        ModelCheckpoint(dirpath=dirpath, every_n_train_steps=every_n_train_steps, **LAST),
    ]
