"""A fully connected network for small images (digits), wide enough to prune to 1 %."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from s2ap_lightning.models.common import InputNormalization


class MLP(nn.Module):
    """Flatten, ``depth`` Linear-BatchNorm-ReLU blocks of ``width`` units, and a linear head.

    Why it exists: with per-layer pruning at sparsity 0.99 a small CNN's 3x3 first convolution keeps
    a handful of weights and every method collapses. Here every layer is large (8x8 digits: 64x512,
    512x512 and 512x10 weights), so 1 % of each is still a working network, while a step costs less
    than the small CNN's.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 8,
        width: int = 512,
        depth: int = 2,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_channels * image_size * image_size
        for _ in range(depth):
            layers += [nn.Linear(features, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            features = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.normalize(x)))
