"""Importance scores, top-k masks, the score-space perturbation and the base methods.

The base methods (HYDRA, HARP, and any registered by subclassing
:class:`~s2ap_lightning.pruning.methods.BaseMethod`) live in :mod:`s2ap_lightning.pruning.methods`.
"""

from s2ap_lightning.models.batchnorm import frozen_bn_statistics
from s2ap_lightning.pruning.masks import (
    kept_count,
    scaled_score_init,
    straight_through,
    topk_mask,
)
from s2ap_lightning.pruning.methods import (
    BaseMethod,
    Harp,
    Hydra,
    MethodState,
    method_from_config,
    method_from_legacy,
)
from s2ap_lightning.pruning.perturbation import layerwise_perturbation, perturbed, score_perturbation
from s2ap_lightning.pruning.scores import masked_forward, prunable_weight_names

__all__ = [
    "BaseMethod",
    "Harp",
    "Hydra",
    "MethodState",
    "frozen_bn_statistics",
    "kept_count",
    "layerwise_perturbation",
    "masked_forward",
    "method_from_config",
    "method_from_legacy",
    "perturbed",
    "prunable_weight_names",
    "scaled_score_init",
    "score_perturbation",
    "straight_through",
    "topk_mask",
]
