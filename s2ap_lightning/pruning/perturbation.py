"""The score-space perturbation of S2AP and the BatchNorm guard of its second pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

#: Added to the gradient norm, as in the method reference, so an all-zero gradient gives ``z = 0``.
GRAD_NORM_EPS = 1e-12


@torch.no_grad()
def score_perturbation(
    scores: Mapping[str, Tensor], grads: Mapping[str, Tensor], gamma: float
) -> dict[str, Tensor]:
    """One ascent step of the inner maximisation, budgeted per layer.

    ``z_l = gamma * ||s_l|| * g_l / (||g_l|| + 1e-12)``: the radius is relative to each layer's own
    score norm (as AWP does for weights), not SAM's single global radius.
    """
    names = list(grads)
    g = [grads[n] for n in names]
    # Multi-tensor kernels: a handful of launches for all layers instead of several per layer, which
    # matters on GPUs where a ResNet-18 step is launch-bound.
    s_norm = torch.stack(torch._foreach_norm([scores[n].detach() for n in names]))
    g_norm = torch.stack(torch._foreach_norm(g))
    factors = (gamma * s_norm / (g_norm + GRAD_NORM_EPS)).unbind()
    return dict(zip(names, torch._foreach_mul(g, factors), strict=True))


@torch.no_grad()
def add_(scores: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> None:
    """In place ``s += delta`` for every layer named in ``delta``."""
    names = list(delta)
    torch._foreach_add_([scores[n] for n in names], [delta[n] for n in names])


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextlib.contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """Forward passes inside leave BatchNorm running statistics untouched.

    Momentum 0 keeps the running mean and variance (``(1 - 0) * running + 0 * batch``) while batch
    statistics still normalise, so the second pass sees the same normalisation as the first; the
    batch counter is restored too. Toggling ``requires_grad`` or eval mode instead would either trip
    DDP's unused-parameter checks or change the loss being minimised.
    """
    layers = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
