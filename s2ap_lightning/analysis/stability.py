"""Mask stability: how many weights flip in or out of the mask between epochs or runs.

The S2AP paper reports fewer mask flips for sharpness-aware search; the normalised Hamming distance
(flips divided by the number of prunable weights) is that measure. The distance itself is mask
maths (:func:`s2ap_lightning.pruning.masks.hamming_distance`); the per-epoch tracker that logs it
during a search is a stage callback, :class:`s2ap_lightning.stages.callbacks.MaskStabilityCallback`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from s2ap_lightning.pruning.fixed_masks import load_masks, pack_masks, unpack_masks
from s2ap_lightning.pruning.masks import hamming_distance as hamming
from s2ap_lightning.pruning.masks import mask_flips

__all__ = [
    "MaskHammingDistance",
    "hamming",
    "load_masks",
    "pack_masks",
    "unpack_masks",
]

#: Names that moved out of this module, and where to import them from now.
MOVED = {"MaskStabilityCallback": "s2ap_lightning.stages.callbacks.MaskStabilityCallback"}


def __getattr__(name: str) -> Any:
    # The tracker is a Lightning callback of the stages, a layer above this one: importing it here
    # would point a dependency upwards, so an old import or class_path fails with the new path.
    if name in MOVED:
        message = (
            f"{name} moved: import it from {MOVED[name].rsplit('.', 1)[0]} (in a config: "
            f"class_path: {MOVED[name]})"
        )
        # Also as a warning: a config parser may swallow the error into "not accessible or invalid".
        warnings.warn(message, FutureWarning, stacklevel=2)
        raise ImportError(message)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        self.flips += mask_flips(previous, current)
        self.total += previous.numel()

    def compute(self) -> Tensor:
        return self.flips.float() / self.total.clamp_min(1)
