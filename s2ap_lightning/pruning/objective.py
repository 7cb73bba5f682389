"""The function a mask search minimises, handed over explicitly: model, base method, loss, adversary.

The analyses (sharpness, landscapes) evaluate this function at score points other than the search's
own, and the stage that ran the search hands it to them as a :class:`SearchObjective`. The
analyses therefore depend on a plain value of this layer, never on the Lightning stage, and the
stage builds the value without importing the analyses. The base method is typed by the operations
the analyses call (:class:`ScoreMethod`), not by its class, so any score-based method (HYDRA, HARP or
a new one) that offers them can be analysed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from s2ap_lightning.attacks.losses import RobustLoss
from s2ap_lightning.attacks.pgd import AttackConfig


class ScoreMethod(Protocol):
    """What the analyses need of a score-based base method: its scores and its own mask rule."""

    def items(self) -> Iterable[tuple[str, Tensor]]:
        """``(layer name, scores)`` of every prunable layer, in a fixed order."""
        ...

    def masks(self) -> dict[str, Tensor]:
        """The binary masks of the current scores."""
        ...

    def effective_weights(
        self, model: nn.Module, masks: Mapping[str, Tensor], differentiable: bool = True
    ) -> dict[str, Tensor]:
        """``w * M``; with ``differentiable`` the gradient path to the scores is kept."""
        ...

    def weights_at(
        self, model: nn.Module, point: Mapping[str, Tensor], differentiable: bool = True
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(w * M(point), M(point))`` at other scores, leaving the stored scores untouched."""
        ...


_METHOD_OPERATIONS = ("items", "masks", "effective_weights", "weights_at")


@dataclass(frozen=True)
class SearchObjective:
    """The robust loss of ``w * M(s)`` that a mask search minimises over the scores ``s``.

    Attributes:
        model: the plain network; its weights ``w`` are fixed during the search.
        method: the base method, which owns the scores and computes the masks (HARP's learnt rates
            included), so that no analysis re-implements a mask rule.
        loss: the search's robust loss (PGD-AT, TRADES or MART), called
            ``loss(model_fn, x, x_adv, y)``; it also crafts its own adversarial examples.
        adversary: the search's training attack, the budget ``loss.adversarial`` is run with.

    """

    model: nn.Module
    method: ScoreMethod
    loss: RobustLoss
    adversary: AttackConfig

    def __post_init__(self) -> None:
        # A method missing one operation would otherwise fail deep inside an analysis.
        missing = [op for op in _METHOD_OPERATIONS if not callable(getattr(self.method, op, None))]
        if missing:
            raise TypeError(
                f"method {type(self.method).__name__} lacks {', '.join(missing)}: a search objective "
                f"needs a score-based method offering {', '.join(_METHOD_OPERATIONS)}"
            )

    def evaluated_weights(self) -> dict[str, Tensor]:
        """``w * M(s)`` at the current scores without a graph: the network the search evaluates.

        The same weights the stage substitutes into the model for validation and testing, so an
        analysis attacks the network the search reported on. Computed outside inference mode, so
        the result can enter a later autograd computation (an attack's input gradient).
        """
        with torch.inference_mode(False), torch.no_grad():
            return self.method.effective_weights(self.model, self.method.masks(), differentiable=False)
