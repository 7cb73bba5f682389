"""Score-based base methods S2AP plugs into: one module per method, registered by subclassing.

:class:`BaseMethod` is a method's specification (its typed options), :class:`MethodState` what it
builds over a model (scores, the method's own state, masks and the search's hooks); see
:mod:`~s2ap_lightning.pruning.methods.base`. HYDRA (:mod:`.hydra`) and HARP (:mod:`.harp`) are
imported here so that they are registered whichever module of the package is imported first.
"""

from __future__ import annotations

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


__all__ = [
    "BASE_METHODS",
    "LEGACY_KEYS",
    "METHODS",
    "BaseMethod",
    "Harp",
    "HarpState",
    "Hydra",
    "HydraState",
    "MethodState",
    "method_class",
    "method_from_config",
    "method_from_legacy",
    "method_names",
]
