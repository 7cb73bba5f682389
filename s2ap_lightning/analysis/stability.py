"""Mask stability: how many weights flip in or out of the mask between epochs or runs.

The S2AP paper reports fewer mask flips for sharpness-aware search; the normalised Hamming distance
(flips divided by the number of prunable weights) is that measure.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.distributed import ReduceOp
from torchmetrics import Metric

from s2ap_lightning.checkpoint import atomic_torch_save
from s2ap_lightning.pruning.fixed_masks import PACKED_FORMAT, load_masks, pack_masks, unpack_masks

__all__ = [
    "MaskHammingDistance",
    "MaskStabilityCallback",
    "hamming",
    "load_masks",
    "pack_masks",
    "unpack_masks",
]


class MaskHammingDistance(Metric):
    """Normalised Hamming distance between pairs of masks, accumulated over layers.

    Under data parallelism every rank holds the same masks, so the summed counts give the same ratio.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("flips", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, previous: Tensor, current: Tensor) -> None:
        if previous.shape != current.shape:
            raise ValueError(f"mask shapes differ: {tuple(previous.shape)} vs {tuple(current.shape)}")
        self.flips += (previous.bool() != current.bool()).sum()
        self.total += previous.numel()

    def compute(self) -> Tensor:
        return self.flips.float() / self.total.clamp_min(1)


def hamming(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> tuple[float, dict[str, float]]:
    """Global and per-layer normalised Hamming distance between two mask sets."""
    if set(a) != set(b):
        raise ValueError(f"mask sets cover different layers: {sorted(set(a) ^ set(b))}")
    total = MaskHammingDistance()
    per_layer = {}
    for name in a:
        layer = MaskHammingDistance()
        layer.update(a[name], b[name])
        total.update(a[name], b[name])
        per_layer[name] = float(layer.compute())
    return float(total.compute()), per_layer


class MaskStabilityCallback(L.Callback):
    """Logs, every mask-search epoch, the Hamming distance to the previous epoch's mask.

    Logged as ``mask/hamming`` (global) and ``mask/hamming/<layer>``; masks are saved per epoch as
    packed bits under ``dirpath`` (default: ``<log dir>/masks``, nothing saved without a logger), as
    ``init.pt`` (the mask search's starting mask) and ``epoch_NNN.pt``.
    """

    def __init__(self, dirpath: str | None = None, save_masks: bool = True) -> None:
        self.dirpath = dirpath
        self.save_masks = save_masks
        self.previous: dict[str, Tensor] | None = None
        self.history: list[dict[str, Any]] = []

    def _masks(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        with torch.no_grad():
            return {n: m.detach().cpu() for n, m in pl_module.scores.masks().items()}

    def _save(self, trainer: L.Trainer, masks: dict[str, Tensor], tag: str) -> None:
        if not self.save_masks:
            return
        if self.dirpath is None and trainer.logger is None:
            return  # no logger and no folder given: nowhere sensible to write
        # `trainer.log_dir` is a collective under DDP (a broadcast from rank 0): every rank reads it,
        # and only then does rank 0 alone write. Reading it on rank 0 only hangs a multi-process run.
        root = Path(self.dirpath or Path(trainer.log_dir) / "masks")
        if not trainer.is_global_zero:
            return
        root.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"format": PACKED_FORMAT, "masks": pack_masks(masks)}, root / f"{tag}.pt")

    @staticmethod
    def _check_ranks_agree(trainer: L.Trainer, masks: dict[str, Tensor]) -> None:
        """Under data parallelism every rank must hold the same mask; fail loudly if not.

        Two all-reduces (max and min) of a per-rank fingerprint per epoch, on every rank. A divergence
        would mean each rank trains and saves a different network while the run looks healthy.
        """
        if trainer.world_size < 2:
            return
        fingerprint = torch.zeros(2, dtype=torch.float64)
        for i, name in enumerate(sorted(masks)):
            kept = masks[name].flatten().to(torch.float64)
            positions = torch.arange(1, kept.numel() + 1, dtype=torch.float64)
            fingerprint += torch.stack([kept.sum(), (kept * positions).sum() * (i + 1)])
        fingerprint = fingerprint.to(trainer.strategy.root_device)
        highest = trainer.strategy.reduce(fingerprint.clone(), reduce_op=ReduceOp.MAX)
        lowest = -trainer.strategy.reduce(-fingerprint, reduce_op=ReduceOp.MAX)
        if not torch.equal(highest, lowest):
            raise RuntimeError(
                f"the masks differ between ranks at epoch {trainer.current_epoch} (mask fingerprints "
                f"from {lowest.tolist()} to {highest.tolist()}): the ranks no longer train the same network"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.previous = self._masks(pl_module)
        if trainer.current_epoch == 0:
            self._save(trainer, self.previous, "init")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        current = self._masks(pl_module)
        self._check_ranks_agree(trainer, current)
        distance, per_layer = hamming(self.previous, current)
        pl_module.log("mask/hamming", distance, sync_dist=True)
        for name, value in per_layer.items():
            pl_module.log(f"mask/hamming/{name}", value, sync_dist=True)
        self.history.append({"epoch": trainer.current_epoch, "hamming": distance, "per_layer": per_layer})
        self._save(trainer, current, f"epoch_{trainer.current_epoch:03d}")
        self.previous = current

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
