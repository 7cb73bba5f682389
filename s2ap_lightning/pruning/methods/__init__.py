"""Score-based base methods S2AP plugs into: one module per method, registered by subclassing.

:class:`BaseMethod` is a method's specification (its typed options), :class:`MethodState` what it
builds over a model (scores, the method's own state, masks and the search's hooks); see
:mod:`~s2ap_lightning.pruning.methods.base`. HYDRA (:mod:`.hydra`) and HARP (:mod:`.harp`) are
imported here so that they are registered whichever module of the package is imported first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from s2ap_lightning.pruning.methods.base import (
    LEGACY_KEYS,
    METHODS,
    BaseMethod,
    MethodState,
    method_class,
    method_from_config,
    method_from_legacy,
    method_names,
)
from s2ap_lightning.pruning.methods.hydra import Hydra, HydraState

# isort: split
# Registration order is the order of ``method_names()`` and of every "valid: ..." message: HYDRA first.
from s2ap_lightning.pruning.methods.harp import Harp, HarpState

#: The built-in methods' names. :func:`method_names` also lists methods registered later.
BASE_METHODS = method_names()


# ----------------------------------------------------------------- transitional
# The mask-search stage still takes every method option as a flat argument. Until it takes
# ``method: BaseMethod`` these two keep it working through the legacy mapping; delete them then.
BaseMethodHooks = MethodState


def check_method_options(base_method: str, options: Mapping[str, Any]) -> None:
    """Transitional: validate flat options (``sparsity`` included); as before, every method's."""
    method = method_from_legacy({**options, "base_method": base_method})
    for cls in (Hydra, Harp):  # a bad value of either method's options fails whichever runs
        cls(**{k: options[k] for k in LEGACY_KEYS[1:] if k in cls.option_names() and k in options})
    method.check_sparsity(options["sparsity"])


def build_method(base_method: str, model: nn.Module, options: Mapping[str, Any]) -> MethodState:
    """Transitional: the method chosen by flat options, built over ``model``."""
    return method_from_legacy({**options, "base_method": base_method}).build(model, options["sparsity"])


__all__ = [
    "BASE_METHODS",
    "LEGACY_KEYS",
    "METHODS",
    "BaseMethod",
    "BaseMethodHooks",
    "Harp",
    "HarpState",
    "Hydra",
    "HydraState",
    "MethodState",
    "build_method",
    "check_method_options",
    "method_class",
    "method_from_config",
    "method_from_legacy",
    "method_names",
]
