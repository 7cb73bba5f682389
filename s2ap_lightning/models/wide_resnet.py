"""WideResNet-28-4 as HARP builds it: HYDRA's network without the block it never calls.

HYDRA's ``models/wrn_cifar.py`` and HARP's copy build the same pre-activation WideResNet with the
same module tree (``conv1``, ``block{1,2,3}.layer.N.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``,
``fc``; no bias in any convolution). HYDRA's also builds ``sub_block1``, a copy of ``block1`` that
``forward`` never uses: 49 more state-dict entries (0.27 M parameters at width 4) that no gradient
reaches, so data-parallel training stops on unused parameters and a sparsity counted over the state
dict includes a block that is not in the network. HARP comments it out and drops ``sub_block1.*``
keys when it loads HYDRA checkpoints; this class follows HARP. HYDRA checkpoints load here with those
keys ignored (:mod:`s2ap_lightning.checkpoint` says so), and ``s2ap export --reference hydra`` adds
them back (a copy of ``block1``) so that the file loads strictly into HYDRA's class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from s2ap_lightning.models.common import InputNormalization


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv-BN-ReLU-conv; a 1x1 ``convShortcut`` where widths differ.

    As in the references, the shortcut convolution sees the activated input, and the identity
    shortcut the raw one.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        # The references' attribute name, so that the state-dict keys are theirs.
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class NetworkBlock(nn.Module):
    """A group of blocks under ``.layer``: the extra level is in the references' key names."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(n)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-width; ``WideResNet(depth=28, widen_factor=4)`` is the paper's WRN-28-4 (5.85 M).

    Args:
        num_classes: outputs of ``fc``.
        in_channels: input channels (3 in the references).
        depth: 6n + 4 layers.
        widen_factor: width multiplier of the three groups.
        mean: per-channel input mean, applied inside the model (not part of the state dict).
        std: per-channel input std, with ``mean``.

    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        depth: int = 28,
        widen_factor: int = 4,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth={depth} is invalid: WideResNet depth must be 6n + 4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = InputNormalization(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn1(out))
        # The references pool with a fixed 8x8 window, which on their 32x32 inputs is this global
        # average; the adaptive pool gives the same logits there and still works on other sizes.
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
