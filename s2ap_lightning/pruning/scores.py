"""What every score-based base method shares: scores over a plain model's prunable weights.

The plain model is never modified: no layer is replaced by a "subnet" layer, so its dense
checkpoints load without surgery and the exported pruned model is an ordinary state dict. The
masked network is evaluated with :func:`torch.func.functional_call`, substituting the effective
weights ``w * M(s)`` for the plain ones.

Only the method-independent pieces live here: which weights are prunable, HYDRA's scaled score
init, top-k masks from per-layer counts, the straight-through effective weights, and the helpers of
the "every layer keeps a weight" checks. How many weights each layer keeps is the base method's
rule (:mod:`s2ap_lightning.pruning.methods`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from s2ap_lightning.models.compiled import masked_forward  # noqa: F401 - this module's public name
from s2ap_lightning.pruning.masks import (
    kept_count,
    largest_feasible_sparsity,
    scaled_score_init,
    straight_through,
    topk_mask,
    topk_masks,
)


def prunable_weight_names(model: nn.Module) -> list[str]:
    """Names of every ``Conv2d`` and ``Linear`` weight (first conv, shortcuts, classifier included).

    Biases and normalisation layers are never pruned.
    """
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names


def exact_zero_fraction(model: nn.Module, weights: Mapping[str, Tensor]) -> float:
    """Share of ``model``'s prunable weights exactly zero in ``weights`` (the mark of a pruned network)."""
    names = [n for n in prunable_weight_names(model) if n in weights]
    total = sum(weights[n].numel() for n in names)
    return sum(int((weights[n] == 0).sum()) for n in names) / total if total else 0.0


def prunable_state_weights(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The prunable weights of a plain state dict (no model at hand): ``Conv2d`` and ``Linear`` weights.

    Recognised by shape, as every exported model is a plain state dict: 4-D or 2-D ``*.weight``
    tensors (BatchNorm and LayerNorm weights are 1-D; a ViT's position embedding is not a ``weight``).
    """
    return {k: v for k, v in state.items() if k.endswith(".weight") and v.dim() in (2, 4)}


def score_key(name: str) -> str:
    """The key of weight ``name``'s entry in a ``ParameterDict`` (whose keys may not contain dots)."""
    return name.replace(".", "__")


def init_scores(model: nn.Module, names: Sequence[str]) -> nn.ParameterDict:
    """One score tensor per weight in ``names``, from HYDRA's scaled init (the first mask is magnitude)."""
    params = dict(model.named_parameters())
    return nn.ParameterDict({score_key(n): nn.Parameter(scaled_score_init(params[n])) for n in names})


def masks_from_counts(items: Sequence[tuple[str, Tensor]], counts: Mapping[str, int]) -> dict[str, Tensor]:
    """Per-layer top-k of ``|s|``: ``counts[name]`` ones in each layer's binary mask.

    On a GPU the selection is launch-bound, so all layers go through one batched selection
    (:func:`~s2ap_lightning.pruning.masks.topk_masks`) instead of a top-k per layer.
    """
    if items and items[0][1].is_cuda:
        masks = topk_masks([s for _, s in items], [counts[n] for n, _ in items])
        return {n: m for (n, _), m in zip(items, masks, strict=True)}
    return {n: topk_mask(s, counts[n]) for n, s in items}


def straight_through_weights(
    model: nn.Module,
    items: Sequence[tuple[str, Tensor]],
    masks: Mapping[str, Tensor],
    differentiable: bool = True,
) -> dict[str, Tensor]:
    """``w * M(s)`` for every scored weight; with ``differentiable`` the STE path to ``s`` is kept.

    The non-differentiable version is what the attacks use: it carries no graph to the scores, so
    attack iterations cost a plain forward and an input gradient.
    """
    params = dict(model.named_parameters())
    out = {}
    for name, score in items:
        weight = params[name].detach()
        mask = masks[name]
        out[name] = weight * (straight_through(mask, score) if differentiable else mask)
    return out


def layer_list(layers: Mapping[str, int]) -> str:
    """``name (size weights)`` for each layer, comma-separated, for one-line error messages."""
    return ", ".join(f"{name} ({n} weights)" for name, n in layers.items())


def largest_clause(feasible: Callable[[float], bool]) -> str:
    """The end of an empty-layer error: the largest sparsity that keeps a weight in every layer."""
    best = largest_feasible_sparsity(feasible)
    if best is None:
        return "no sparsity keeps at least one weight in every layer"
    return f"the largest sparsity that keeps at least one weight in every layer is {best:g}"


def check_layers_keep_a_weight(sizes: Mapping[str, int], sparsity: float) -> None:
    """Refuse, before any training, a sparsity under which a per-layer top-k would empty a layer.

    An empty layer cuts the network: it then predicts one class whatever the input, and the search
    would report its accuracy as if it were a result. A layer keeping ``round((1 - sparsity) *
    numel)`` weights (HYDRA's per-layer rule, HARP's start) empties its smallest layers first.
    """

    def all_kept(s: float) -> bool:
        return all(kept_count(n, s) >= 1 for n in sizes.values())

    empty = {name: n for name, n in sizes.items() if kept_count(n, sparsity) < 1}
    if empty:
        raise ValueError(
            f"sparsity={sparsity} leaves {len(empty)} of {len(sizes)} prunable layers with no "
            f"weight (a layer keeps round((1 - sparsity) * size)): {layer_list(empty)}; "
            f"{largest_clause(all_kept)}"
        )
