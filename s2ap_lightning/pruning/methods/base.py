"""The interface a score-based base method offers the mask search.

As in anomalib's split, the algorithm lives here and the Lightning stage only calls it. A base
method is a :class:`~s2ap_lightning.pruning.scores.ScoreSet` (its scores and masks) that also owns
its own state and hooks. The stage never asks which method it holds; a new method is a new
module here and a line in the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor


class BaseMethodHooks:
    """Hooks with the neutral defaults of a method that has nothing beyond its scores (HYDRA)."""

    #: Registry name (``base_method`` option).
    name: ClassVar[str] = ""

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Validate this method's own options (called for every method: a bad value fails anywhere)."""

    @classmethod
    def check_selected(cls, options: Mapping[str, Any]) -> None:
        """Validate options against this method when it is the one selected."""

    @classmethod
    def from_options(cls, model: Any, options: Mapping[str, Any]) -> BaseMethodHooks:
        raise NotImplementedError

    def extra_loss(self) -> Tensor | None:
        """A term added to the robust loss of every pass (HARP's weighted size loss); None: none."""
        return None

    def after_optimizer_step(self) -> None:
        """Called after every optimiser step (HARP clamps its rates)."""

    def end_of_epoch(self, density: float, epoch: int) -> dict[str, float]:
        """Called with the mask density after every search epoch; returns figures to log."""
        return {}

    def within_budget(self) -> bool:
        """Whether the current mask may become ``best.ckpt`` (HYDRA's exact counts always may)."""
        return True

    def end_of_search_warning(self) -> str | None:
        """A message for the user when the search ends outside what the method promised."""
        return None
