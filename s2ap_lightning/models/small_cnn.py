"""A small CNN sized for 8x8 digits and other tiny inputs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from s2ap_lightning.models.common import InputNormalization


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks, global average pooling and a linear head.

    Big enough to be robust on digits, small enough to pretrain, prune and finetune on a laptop CPU
    in a few minutes.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.normalize(x)))
