"""HYDRA: one score per weight, a fixed per-layer (or global) keep rate, top-k masks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from s2ap_lightning.pruning.methods.base import BaseMethodHooks
from s2ap_lightning.pruning.scores import SCOPES, ScoreSet


class Hydra(ScoreSet, BaseMethodHooks):
    """HYDRA's scores (scaled-score init, straight-through top-k) with no state beyond them.

    Options: ``sparsity``; ``scope`` (``layer``, the paper's, or ``global``: one threshold on
    RMS-normalised scores across layers) and ``min_layer_keep`` (with ``global``, the fraction of every
    layer always kept).
    """

    name = "hydra"

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        if options.get("scope", "layer") not in SCOPES:
            raise ValueError(f"scope={options['scope']!r} is unknown; valid: {', '.join(SCOPES)}")

    @classmethod
    def from_options(cls, model: nn.Module, options: Mapping[str, Any]) -> Hydra:
        return cls(
            model,
            options["sparsity"],
            scope=options.get("scope", "layer"),
            min_layer_keep=options.get("min_layer_keep", 0.0),
        )
