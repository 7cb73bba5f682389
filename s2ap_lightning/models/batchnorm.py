"""BatchNorm utilities shared by the stages (the S2AP second pass, AWP's ascent, ``freeze_bn``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

#: Every BatchNorm flavour whose running statistics or affine parameters the stages treat specially.
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BATCHNORM_TYPES)]


@contextlib.contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """Forward passes inside leave BatchNorm running statistics untouched.

    Momentum 0 keeps the running mean and variance (``(1 - 0) * running + 0 * batch``) while batch
    statistics still normalise, so a second pass sees the same normalisation as the first; the
    batch counter is restored too. Toggling ``requires_grad`` or eval mode instead would either trip
    DDP's unused-parameter checks or change the loss being minimised.
    """
    layers = [m for m in batchnorm_layers(model) if m.track_running_stats]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
