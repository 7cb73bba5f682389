"""Top-k masks over importance scores and the straight-through estimator.

The mask is a pure function of the scores. Everything here is written so that a caller can compute
it once per optimiser step and reuse it for every forward of that step (the attack iterations
included); the reference implementations of HYDRA and HARP sort the scores on every forward.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kept_count(numel: int, sparsity: float) -> int:
    """Number of weights a layer keeps at the given sparsity.

    ``sparsity`` is always the *pruned* fraction: 0.9 keeps 10 % of the weights. The count is
    ``round((1 - sparsity) * numel)`` exactly, as the method reference states; at extreme sparsity
    a small layer can therefore keep nothing, which is the faithful behaviour.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity!r} must lie in [0, 1] (the pruned fraction)")
    return int(round((1.0 - sparsity) * numel))


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


def hamming_distance(a: Tensor, b: Tensor) -> Tensor:
    """Number of positions where two binary masks differ."""
    return (a.bool() != b.bool()).sum()
