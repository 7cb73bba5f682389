"""VGG-16 with BatchNorm, HYDRA's variant (2x2 adaptive pool, 2048-256-256-classes classifier)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from s2ap_lightning.models.common import InputNormalization

_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16BN(nn.Module):
    """Key names ``features.N`` and ``classifier.{0,2,4}`` as in HYDRA's ``vgg16_bn``."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        layers: list[nn.Module] = []
        channels = in_channels
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 2 * 2, 256),
            nn.ReLU(True),
            nn.Linear(256, 256),
            nn.ReLU(True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.avgpool(self.features(self.normalize(x)))
        return self.classifier(out.flatten(1))
