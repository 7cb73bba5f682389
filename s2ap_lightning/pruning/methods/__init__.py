"""Score-based base methods S2AP plugs into, by name: one module per method, one registry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from s2ap_lightning.pruning.methods.base import BaseMethodHooks
from s2ap_lightning.pruning.methods.harp import Harp
from s2ap_lightning.pruning.methods.hydra import Hydra

METHODS: dict[str, type] = {cls.name: cls for cls in (Hydra, Harp)}
BASE_METHODS = tuple(METHODS)


def check_method_options(base_method: str, options: Mapping[str, Any]) -> None:
    """Validate every method's options (a bad value fails whichever method runs) and the chosen one."""
    if base_method not in METHODS:
        raise ValueError(f"base_method={base_method!r} is unknown; valid: {', '.join(METHODS)}")
    for cls in METHODS.values():
        cls.check_options(options)
    METHODS[base_method].check_selected(options)


def build_method(base_method: str, model: nn.Module, options: Mapping[str, Any]) -> BaseMethodHooks:
    """The base method ``base_method`` over ``model``'s prunable weights."""
    check_method_options(base_method, options)
    return METHODS[base_method].from_options(model, options)


__all__ = [
    "BASE_METHODS",
    "METHODS",
    "BaseMethodHooks",
    "Harp",
    "Hydra",
    "build_method",
    "check_method_options",
]
