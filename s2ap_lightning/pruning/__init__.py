"""Importance scores, top-k masks and the score-space perturbation."""

from s2ap_lightning.models.batchnorm import frozen_bn_statistics
from s2ap_lightning.pruning.masks import (
    kept_count,
    scaled_score_init,
    straight_through,
    topk_mask,
)
from s2ap_lightning.pruning.perturbation import layerwise_perturbation, perturbed, score_perturbation
from s2ap_lightning.pruning.scores import ScoreSet, masked_forward, prunable_weight_names

__all__ = [
    "ScoreSet",
    "frozen_bn_statistics",
    "kept_count",
    "layerwise_perturbation",
    "masked_forward",
    "perturbed",
    "prunable_weight_names",
    "scaled_score_init",
    "score_perturbation",
    "straight_through",
    "topk_mask",
]
