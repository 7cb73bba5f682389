"""The function the mask search minimised, as the analyses evaluate it at other score points.

Sharpness and landscapes must measure the robust loss the search used (PGD-AT, TRADES or MART) on
masks the base method itself computes. Both come from the :class:`SearchObjective` the search hands
over (``ScoreSpaceSAMPruner.objective()``), so no analysis re-implements a loss, an adversary or a
mask, and none depends on the Lightning stage.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from s2ap_lightning.attacks.pgd import eval_mode
from s2ap_lightning.pruning.objective import ScoreMethod, SearchObjective
from s2ap_lightning.pruning.scores import masked_forward

__all__ = ["ScoreMethod", "SearchObjective", "fixed_adversarial", "robust_loss_at"]


def fixed_adversarial(objective: SearchObjective, x: Tensor, y: Tensor, seed: int) -> Tensor:
    """Adversarial examples of the search's own loss (its adversary) at the current scores, eval mode.

    Crafted once and then kept fixed, so that every score point an analysis visits is compared on
    the same inputs.
    """
    torch.manual_seed(seed)
    model = objective.model
    frozen = objective.evaluated_weights()  # w * M(s), the network the search evaluates
    with eval_mode(model), torch.enable_grad():
        # Eager and fp32 (not the search's training forward, which may be compiled or low precision).
        return objective.loss.adversarial(
            lambda inp: masked_forward(model, frozen, inp), x, y, objective.adversary, model
        )


def robust_loss_at(
    objective: SearchObjective,
    point: Mapping[str, Tensor],
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    differentiable: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The search's robust loss of ``w * M(point)`` on fixed adversarial examples, and those masks."""
    model = objective.model
    weights, masks = objective.method.weights_at(model, point, differentiable)
    out = objective.loss(lambda inp: masked_forward(model, weights, inp), x, x_adv, y)
    return out.loss, masks
