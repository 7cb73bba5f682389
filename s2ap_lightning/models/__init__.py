"""Plain ``nn.Module`` architectures, selected by name.

Nothing here knows about pruning: masks live beside the model, never inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from s2ap_lightning.models.resnet import ResNet18
from s2ap_lightning.models.small_cnn import SmallCNN
from s2ap_lightning.models.vgg import VGG16BN
from s2ap_lightning.models.wide_resnet import WideResNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": ResNet18,
    "vgg16_bn": VGG16BN,
    "wrn28_4": lambda **kw: WideResNet(depth=28, widen_factor=4, **kw),
}


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Instantiate a plain architecture by its registry name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)


__all__ = ["MODELS", "ResNet18", "SmallCNN", "VGG16BN", "WideResNet", "build_model"]
