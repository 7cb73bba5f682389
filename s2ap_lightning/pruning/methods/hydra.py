"""HYDRA: one score per weight and a keep rate fixed by the sparsity, per layer or across layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from s2ap_lightning.checks import check_range
from s2ap_lightning.pruning.masks import kept_count
from s2ap_lightning.pruning.methods.base import BaseMethod, MethodState
from s2ap_lightning.pruning.scores import check_layers_keep_a_weight, largest_clause

#: Pruning scopes of HYDRA's top-k: per layer (the paper's) or one threshold across layers.
SCOPES = ("layer", "global")


class Hydra(BaseMethod):
    """HYDRA's mask search: scaled-score init, straight-through top-k, nothing learnt beyond the scores.

    Args:
        scope: ``layer`` (every layer keeps ``round((1 - sparsity) * size)`` weights, the paper's
            setting) or ``global`` (one threshold across layers on scores normalised by each
            layer's RMS, so that layers of different fan-in compare; the network keeps
            ``1 - sparsity`` of its weights).
        min_layer_keep: with ``global``, the fraction of every layer kept whatever the ranking (at
            least one weight), so that no layer is cut off entirely; at most ``1 - sparsity``.

    Both options define the mask (:attr:`mask_defining`).

    """

    name = "hydra"
    mask_defining = ("scope", "min_layer_keep")

    def __init__(self, scope: Literal["layer", "global"] = "layer", min_layer_keep: float = 0.0) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} is unknown; valid: {', '.join(SCOPES)}")
        check_range("min_layer_keep", min_layer_keep, 0.0, 1.0)
        self.scope = scope
        self.min_layer_keep = float(min_layer_keep)

    def check_sparsity(self, sparsity: float) -> None:
        super().check_sparsity(sparsity)
        if self.min_layer_keep > 1.0 - sparsity:
            raise ValueError(
                f"min_layer_keep={self.min_layer_keep} is out of range: valid range is "
                f"[0, {1 - sparsity:g}] at sparsity={sparsity}"
            )

    def build(self, model: nn.Module, sparsity: float) -> HydraState:
        return HydraState(self, model, sparsity)


class HydraState(MethodState):
    """HYDRA built over a model: its scores and the top-k counts of its scope.

    State-dict keys: ``scores.<layer key>`` only.
    """

    method: Hydra

    def __init__(self, method: Hydra, model: nn.Module, sparsity: float) -> None:
        super().__init__(method, model, sparsity)
        if method.scope == "global":
            _check_global_budget(self.layer_sizes(), sparsity)
        else:
            check_layers_keep_a_weight(self.layer_sizes(), sparsity)

    def kept_counts(self) -> dict[str, int]:
        if self.method.scope == "global":
            return global_kept_counts(self.items(), self.sparsity, self.method.min_layer_keep)
        return {n: kept_count(s.numel(), self.sparsity) for n, s in self.items()}


@torch.no_grad()
def global_kept_counts(
    items: Sequence[tuple[str, Tensor]], sparsity: float, min_layer_keep: float
) -> dict[str, int]:
    """One threshold on RMS-normalised ``|s|`` across layers, each layer keeping a minimum.

    Every layer first keeps its ``max(1, round(min_layer_keep * size))`` largest scores; the rest of
    the network-wide budget ``round((1 - sparsity) * total)`` goes to the largest normalised scores
    left, wherever they are.
    """
    total = sum(s.numel() for _, s in items)
    budget = kept_count(total, sparsity)
    minimum = {n: min(s.numel(), max(1, round(min_layer_keep * s.numel()))) for n, s in items}
    normalised = []
    for name, s in items:
        a = s.detach().abs().flatten()
        a = a / a.pow(2).mean().sqrt().clamp_min(1e-12)
        reserved = torch.topk(a, minimum[name]).indices
        a = a.clone()
        a[reserved] = -1.0  # already kept: not competing for the global budget
        normalised.append(a)
    rest = max(budget - sum(minimum.values()), 0)
    flat = torch.cat(normalised)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if rest:
        chosen[torch.topk(flat, rest).indices] = True
    counts, offset = {}, 0
    for (name, _), a in zip(items, normalised, strict=True):
        counts[name] = minimum[name] + int(chosen[offset : offset + a.numel()].sum())
        offset += a.numel()
    return counts


def _check_global_budget(sizes: Mapping[str, int], sparsity: float) -> None:
    """Refuse a network-wide budget smaller than one weight per layer (checked before training).

    With ``global`` every layer keeps at least one weight by construction, but the budget must cover
    those minimums, or the masks would silently keep more than the sparsity asked.
    """
    total, layers = sum(sizes.values()), len(sizes)

    def enough(s: float) -> bool:
        return kept_count(total, s) >= layers

    if not enough(sparsity):
        raise ValueError(
            f"sparsity={sparsity} with scope='global' allows {kept_count(total, sparsity)} "
            f"of {total} weights, fewer than one for each of the {layers} prunable layers; "
            f"{largest_clause(enough)}"
        )
