"""torchvision's ResNet-50 for ImageNet, with normalisation inside the model.

A subclass rather than a wrapper: the state dict keys are exactly torchvision's (``conv1``,
``layer1.0.downsample.0``, ``fc``), so torchvision checkpoints load strictly and exported pruned
models load into ``torchvision.models.resnet50()``. HYDRA's and HARP's ``models/resnet.py:ResNet50``
(the paper's ImageNet model) is the same network with the same keys (stride in the 3x3 convolution);
they normalise before the model (HYDRA's data pipeline, HARP's ``--normalize``) with the same
ImageNet statistics this class applies inside (``tests/test_reference_models.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet

from s2ap_lightning.models.common import InputNormalization

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNet50(ResNet):
    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
    ) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.normalize = InputNormalization(mean, std)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.normalize(x))
