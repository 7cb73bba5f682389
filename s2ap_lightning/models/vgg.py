"""VGG-16 with BatchNorm exactly as the paper's reference codes build it.

HYDRA's ``models/vgg_cifar.py:vgg16_bn``, HARP's copy of it and the adversarial pruning benchmark's
``models/base_vgg16.py:vgg16_bn`` are one network: thirteen 3x3 convolutions *without* bias (each is
followed by BatchNorm, whose shift makes a bias redundant), four max-pools (none after the last
block), a 2x2 adaptive average pool and a 2048-256-256-classes classifier. Published HYDRA, HARP and
benchmark checkpoints are state dicts of that class, so the layers, their order (the ``features.N``
and ``classifier.{0,2,4}`` indices) and the forward function here are the same;
``tests/test_reference_models.py`` checks keys and shapes against the committed reference lists.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from s2ap_lightning.models.common import InputNormalization

# No max-pool after the last three convolutions: on 32x32 inputs the features end at 2x2, which the
# 2x2 adaptive pool passes through unchanged (the references' layout; a fifth pool would reach 1x1
# and the adaptive pool would copy each value four times: another network).
_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class VGG16BN(nn.Module):
    """The references' ``vgg16_bn`` (15.3 M parameters at 10 classes).

    Args:
        num_classes: outputs of the last linear layer.
        in_channels: input channels (3 in every reference).
        mean: per-channel input mean, applied inside the model (not part of the state dict).
        std: per-channel input std, with ``mean``.

    """

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
                conv = nn.Conv2d(channels, v, 3, padding=1, bias=False)
                layers += [conv, nn.BatchNorm2d(v), nn.ReLU(True)]
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
