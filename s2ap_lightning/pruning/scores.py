"""Importance scores over a plain model's prunable weights.

The plain model is never modified: no layer is replaced by a "subnet" layer, so its dense
checkpoints load without surgery and the exported pruned model is an ordinary state dict. The
masked network is evaluated with :func:`torch.func.functional_call`, substituting the effective
weights ``w * M(s)`` for the plain ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from s2ap_lightning.pruning.masks import kept_count, scaled_score_init, straight_through, topk_mask


def prunable_weight_names(model: nn.Module) -> list[str]:
    """Names of every ``Conv2d`` and ``Linear`` weight (first conv, shortcuts, classifier included).

    Biases and normalisation layers are never pruned.
    """
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names


def _key(name: str) -> str:
    """ParameterDict keys may not contain dots."""
    return name.replace(".", "__")


class ScoreSet(nn.Module):
    """One real-valued score per prunable weight and the per-layer top-k mask it induces.

    Args:
        model: the plain network whose weights are scored (not registered as a submodule, so the
            scores' state dict holds scores only).
        sparsity: pruned fraction in (0, 1); 0.9 keeps 10 % of every layer.

    """

    def __init__(self, model: nn.Module, sparsity: float) -> None:
        super().__init__()
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity!r} is out of range: it must lie in (0, 1)")
        self.sparsity = sparsity
        self.names = prunable_weight_names(model)
        params = dict(model.named_parameters())
        self.scores = nn.ParameterDict(
            {_key(n): nn.Parameter(scaled_score_init(params[n])) for n in self.names}
        )
        #: How many times the masks were computed; the benchmark reads it.
        self.mask_computations = 0

    def __getitem__(self, name: str) -> nn.Parameter:
        return self.scores[_key(name)]

    def items(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, self[n]) for n in self.names]

    @torch.no_grad()
    def reinitialise(self, model: nn.Module) -> None:
        """Scaled score init from the model's current weights (after ``init_from`` loaded them)."""
        params = dict(model.named_parameters())
        for name, score in self.items():
            score.copy_(scaled_score_init(params[name]))

    def kept_counts(self) -> dict[str, int]:
        """Per-layer number of kept weights; base methods with learnt rates override this."""
        return {n: kept_count(s.numel(), self.sparsity) for n, s in self.items()}

    def masks(self) -> dict[str, Tensor]:
        """Binary masks of the current scores: one top-k per layer."""
        self.mask_computations += 1
        counts = self.kept_counts()
        return {n: topk_mask(s, counts[n]) for n, s in self.items()}

    def effective_weights(
        self, model: nn.Module, masks: Mapping[str, Tensor], differentiable: bool = True
    ) -> dict[str, Tensor]:
        """``w * M(s)``; with ``differentiable`` the straight-through path to the scores is kept.

        The non-differentiable version is what the attacks use: it carries no graph to the scores,
        so attack iterations cost a plain forward and an input gradient.
        """
        params = dict(model.named_parameters())
        out = {}
        for name, score in self.items():
            weight = params[name].detach()
            mask = masks[name]
            out[name] = weight * (straight_through(mask, score) if differentiable else mask)
        return out

    def density(self, masks: Mapping[str, Tensor]) -> float:
        """Fraction of prunable weights kept."""
        kept = sum(float(m.sum()) for m in masks.values())
        return kept / sum(m.numel() for m in masks.values())


def masked_forward(model: nn.Module, weights: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Run the plain model with some of its weights substituted.

    Parameters and buffers not named in ``weights`` are the model's own, so BatchNorm running
    statistics update in place exactly as in a normal forward.
    """
    return functional_call(model, dict(weights), (x,), strict=False)
