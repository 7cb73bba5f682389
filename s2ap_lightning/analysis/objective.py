"""The function the mask search minimised, as the analyses evaluate it at other score points.

Sharpness and landscapes must measure the robust loss the search used (PGD-AT, TRADES or MART) on
masks the base method itself computes; both come from the pruner, so no analysis re-implements a
loss, an adversary or a mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from s2ap_lightning.attacks.pgd import eval_mode
from s2ap_lightning.pruning.scores import masked_forward


def fixed_adversarial(pruner: Any, x: Tensor, y: Tensor, seed: int) -> Tensor:
    """Adversarial examples of the search's own loss (its adversary) at the current scores, eval mode."""
    torch.manual_seed(seed)
    model = pruner.model
    frozen = pruner.weights_for_eval()  # w * M(s), the network the pruner evaluates
    with eval_mode(model), torch.enable_grad():
        # Eager and fp32 (not the pruner's training forward, which may be compiled or low precision).
        return pruner.robust_loss.adversarial(
            lambda inp: masked_forward(model, frozen, inp), x, y, pruner.train_attack, model
        )


def robust_loss_at(
    pruner: Any,
    point: Mapping[str, Tensor],
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    differentiable: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The search's robust loss of ``w * M(point)`` on fixed adversarial examples, and those masks."""
    model = pruner.model
    weights, masks = pruner.scores.weights_at(model, point, differentiable)
    out = pruner.robust_loss(lambda inp: masked_forward(model, weights, inp), x, x_adv, y)
    return out.loss, masks
