"""Plain ``nn.Module`` architectures, selected by name.

Nothing here knows about pruning: masks live beside the model, never inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from s2ap_lightning.models.mlp import MLP
from s2ap_lightning.models.resnet import ResNet18
from s2ap_lightning.models.small_cnn import SmallCNN
from s2ap_lightning.models.vgg import VGG16BN
from s2ap_lightning.models.vit import ViT
from s2ap_lightning.models.wide_resnet import WideResNet


def _resnet50(**kw: object) -> nn.Module:
    from s2ap_lightning.models.resnet50 import IMAGENET_MEAN, IMAGENET_STD, ResNet50

    kw.pop("image_size", None)
    kw["mean"] = kw.get("mean") or IMAGENET_MEAN
    kw["std"] = kw.get("std") or IMAGENET_STD
    return ResNet50(**kw)


def _without_size(cls: Callable[..., nn.Module], **fixed: object) -> Callable[..., nn.Module]:
    def build(**kw: object) -> nn.Module:
        kw.pop("image_size", None)
        return cls(**fixed, **kw)

    return build


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": _without_size(SmallCNN),
    "mlp": MLP,
    "resnet18": _without_size(ResNet18),
    "vgg16_bn": _without_size(VGG16BN),
    "wrn28_4": _without_size(WideResNet, depth=28, widen_factor=4),
    "vit": ViT,
    "resnet50": _resnet50,
}


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    image_size: int = 32,
) -> nn.Module:
    """Instantiate a plain architecture by its registry name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[name](
        num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, image_size=image_size
    )


__all__ = ["MLP", "MODELS", "ResNet18", "SmallCNN", "VGG16BN", "ViT", "WideResNet", "build_model"]
