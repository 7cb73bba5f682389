"""Top-k masks over importance scores, the straight-through estimator, and distances between masks.

The mask is a pure function of the scores. Everything here is written so that a caller can compute
it once per optimiser step and reuse it for every forward of that step (the attack iterations
included); the reference implementations of HYDRA and HARP sort the scores on every forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor


def kept_count(numel: int, sparsity: float) -> int:
    """Number of weights a layer keeps at the given sparsity.

    ``sparsity`` is always the *pruned* fraction: 0.9 keeps 10 % of the weights. The count is
    ``round((1 - sparsity) * numel)`` exactly, as the method reference states; at extreme sparsity
    a small layer can therefore keep nothing. A network with an empty layer passes no signal (it
    predicts a constant), so every base method refuses such a sparsity when it is built, before
    training (:func:`largest_feasible_sparsity` says how far one can go).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity!r} must lie in [0, 1] (the pruned fraction)")
    return int(round((1.0 - sparsity) * numel))


def largest_feasible_sparsity(feasible: Callable[[float], bool]) -> float | None:
    """The largest sparsity, rounded down to a readable value, for which ``feasible`` still holds.

    Used in the error message of a sparsity that would empty a layer, so that the user learns the
    limit rather than guessing it. ``feasible`` must be monotone (true up to a threshold, false
    beyond), as every "each layer keeps a weight" rule is. The threshold is found by bisection and
    then reported with three significant digits of the kept fraction ``1 - sparsity`` (0.99884, not
    0.9988425925), rounded so that the printed value itself is feasible. None when not even
    sparsity 0 is.
    """
    if not feasible(0.0):
        return None
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    keep = 1.0 - lo
    step = 10.0 ** (math.floor(math.log10(keep)) - 2)
    digits = max(0, -round(math.log10(step)))
    keep_up = math.ceil(keep / step - 1e-9) * step
    while keep_up < 1.0 and not feasible(round(1.0 - keep_up, digits)):
        keep_up += step
    return max(0.0, round(1.0 - keep_up, digits))


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Binary mask (same dtype as ``scores``) with ones at the ``k`` largest ``|scores|``.

    Ties are broken by ``torch.topk``; the count is exact whatever the ties.
    """
    flat = scores.detach().abs().flatten()
    mask = torch.zeros_like(flat)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = 1.0
    return mask.view_as(scores)


def straight_through(mask: Tensor, scores: Tensor) -> Tensor:
    """The mask in the forward pass, an identity on ``|scores|`` in the backward pass.

    ``mask + |s| - |s|.detach()`` equals the mask exactly in value (the two ``|s|`` terms cancel
    bit for bit), and its derivative with respect to ``s`` is ``sign(s)``. Multiplying by the
    frozen weight therefore yields HYDRA's score gradient ``sign(s) * w * dL/dw_eff`` for every
    score, pruned ones included, so pruned weights can come back.
    """
    magnitude = scores.abs()
    return mask + (magnitude - magnitude.detach())


def scaled_score_init(weight: Tensor) -> Tensor:
    """HYDRA's scaled score initialisation ``sqrt(6 / fan_in) * w / max|w|``.

    Being a positive multiple of ``w``, its top-k of ``|s|`` is exactly layer-wise magnitude pruning.
    """
    fan_in = weight[0].numel()
    peak = weight.detach().abs().max().clamp_min(torch.finfo(weight.dtype).tiny)
    return (6.0 / fan_in) ** 0.5 * weight.detach() / peak


def topk_masks(scores: Sequence[Tensor], counts: Sequence[int]) -> list[Tensor]:
    """Per-tensor top-k masks of ``|s|`` for many tensors at once (two sorts instead of one top-k each).

    Same selection as :func:`topk_mask` on every tensor (up to the order of exact ties): all scores
    are sorted once by value, then stably by tensor, so each tensor's block is in descending order and
    its first ``k`` entries are kept. On a GPU this replaces a few hundred small kernel launches per
    mask computation (a ResNet-18 has 62 prunable layers) by about fifteen.
    """
    flat = [s.detach().flatten() for s in scores]
    sizes = [f.numel() for f in flat]
    values = torch.cat(torch._foreach_abs(flat))
    device = values.device
    layer = torch.repeat_interleave(
        torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device)
    )
    order = torch.argsort(values, descending=True, stable=True)
    order = order[torch.argsort(layer[order], stable=True)]
    starts = torch.tensor([0, *sizes[:-1]], device=device).cumsum(0)
    rank = torch.arange(values.numel(), device=device) - starts[layer]
    keep = rank < torch.tensor(list(counts), device=device)[layer]
    mask = torch.zeros_like(values)
    mask[order] = keep.to(values.dtype)
    return [m.view_as(s) for m, s in zip(mask.split(sizes), scores, strict=True)]


def mask_flips(previous: Tensor, current: Tensor) -> Tensor:
    """Number of weights kept by one of two masks of the same layer and pruned by the other."""
    if previous.shape != current.shape:
        raise ValueError(f"mask shapes differ: {tuple(previous.shape)} vs {tuple(current.shape)}")
    return (previous.bool() != current.bool()).sum()


def hamming_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> tuple[float, dict[str, float]]:
    """Global and per-layer normalised Hamming distance between two mask sets.

    Flips divided by the number of prunable weights: the mask-stability measure of the S2AP paper
    (fewer flips between epochs or seeds for a sharpness-aware search). The global figure weighs
    every weight equally, so large layers dominate it; the per-layer figures show the small ones.
    """
    if set(a) != set(b):
        raise ValueError(f"mask sets cover different layers: {sorted(set(a) ^ set(b))}")
    flips = {name: int(mask_flips(a[name], b[name])) for name in a}
    sizes = {name: a[name].numel() for name in a}
    per_layer = {name: flips[name] / max(sizes[name], 1) for name in a}
    return sum(flips.values()) / max(sum(sizes.values()), 1), per_layer
