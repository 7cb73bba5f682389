"""The layer-wise relative perturbation shared by S2AP (on scores) and AWP (on weights).

``z_l = gamma * ||p_l|| * g_l / (||g_l|| + 1e-12)``: one ascent step of the inner maximisation with
a radius relative to each layer's own norm, not SAM's single global radius. S2AP applies it to the
scores, AWP to the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

#: Added to the gradient norm, as in the method reference, so an all-zero gradient gives ``z = 0``.
GRAD_NORM_EPS = 1e-12


@torch.no_grad()
def layerwise_perturbation(
    params: Mapping[str, Tensor], grads: Mapping[str, Tensor], gamma: float
) -> dict[str, Tensor]:
    """``z_l = gamma * ||p_l|| * g_l / (||g_l|| + 1e-12)`` for every layer named in ``grads``."""
    names = list(grads)
    g = [grads[n] for n in names]
    # Multi-tensor kernels: a handful of launches for all layers instead of several per layer, which
    # matters on GPUs where a ResNet-18 step is launch-bound.
    p_norm = torch.stack(torch._foreach_norm([params[n].detach() for n in names]))
    g_norm = torch.stack(torch._foreach_norm(g))
    factors = (gamma * p_norm / (g_norm + GRAD_NORM_EPS)).unbind()
    return dict(zip(names, torch._foreach_mul(g, factors), strict=True))


#: S2AP's name for it: the perturbation of the scores.
score_perturbation = layerwise_perturbation


@contextlib.contextmanager
def perturbed(params: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> Iterator[None]:
    """``p += delta`` inside the block; on leaving it, even on an error, ``p`` is restored exactly.

    The originals are copied back rather than ``delta`` subtracted, which could differ in the last bit.
    """
    names = list(delta)
    targets = [params[n] for n in names]
    with torch.no_grad():
        originals = [t.detach().clone() for t in targets]
        torch._foreach_add_(targets, [delta[n] for n in names])
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(targets, originals)
