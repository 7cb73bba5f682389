"""HARP: learnt per-layer keep rates pushed to the density target by a scheduled size loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from s2ap_lightning.checks import check_range
from s2ap_lightning.pruning.methods.base import BaseMethodHooks
from s2ap_lightning.pruning.scores import RATE_GRADS, HarpScoreSet


class Harp(HarpScoreSet, BaseMethodHooks):
    """HARP's scores and rates, its size-loss schedule and its density budget.

    Scores and rates: :class:`~s2ap_lightning.pruning.scores.HarpScoreSet`.

    Options:
        size_loss_weight: the size-loss weight is ``size_loss_weight * (epoch + 1)`` in epoch
            ``epoch`` (from 0), HARP's step-wise incremental weight, until the density target is met;
            from then on it stays. HARP's own runs use 0.01 (CIFAR-10) and 0.1 (ImageNet); 1.0 is the
            default of HARP's code.
        rate_grad: ``logit`` (the method reference's wording) or ``keep`` (HARP's code).
        rate_bound: rates clamped to ``[-rate_bound, rate_bound]`` after every step (None: no clamp).
        density_tolerance: ``best.ckpt`` only from epochs whose density is in
            ``[target - density_tolerance, target]`` (never over the budget, as HARP selects).

    The schedule lives in buffers, so a resumed search continues it. The rates start *at* the target,
    so "met" means back at or under it after having exceeded it (the robust loss first pulls the rates
    up); HARP's runs start above the target, where the two readings agree.
    """

    name = "harp"

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        size_loss_weight: float = 1.0,
        density_tolerance: float = 0.005,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, sparsity, **kwargs)
        self.base_weight = float(size_loss_weight)
        self.density_tolerance = float(density_tolerance)
        self.register_buffer("size_weight", torch.tensor(self.base_weight))
        self.register_buffer("size_weight_frozen", torch.tensor(False))
        self.register_buffer("size_above_target", torch.tensor(False))
        self.register_buffer("budget_met", torch.tensor(False))

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        check_range("size_loss_weight", options.get("size_loss_weight", 1.0), 0.0, None)
        bound = options.get("rate_bound", 6.0)
        if bound is not None:
            check_range("rate_bound", bound, 0.0, None, low_open=True)
        check_range("density_tolerance", options.get("density_tolerance", 0.005), 0.0, 1.0)
        if options.get("rate_grad", "logit") not in RATE_GRADS:
            raise ValueError(f"rate_grad={options['rate_grad']!r} is unknown; valid: {', '.join(RATE_GRADS)}")

    @classmethod
    def check_selected(cls, options: Mapping[str, Any]) -> None:
        if options.get("scope", "layer") != "layer":
            raise ValueError("scope='global' does not apply to base_method='harp' (its rates set each layer)")

    @classmethod
    def from_options(cls, model: nn.Module, options: Mapping[str, Any]) -> Harp:
        return cls(
            model,
            options["sparsity"],
            size_loss_weight=options.get("size_loss_weight", 1.0),
            density_tolerance=options.get("density_tolerance", 0.005),
            rate_grad=options.get("rate_grad", "logit"),
            rate_bound=options.get("rate_bound", 6.0),
        )

    # ----------------------------------------------------------------- hooks
    def extra_loss(self) -> Tensor:
        return self.size_weight * self.size_loss()

    def after_optimizer_step(self) -> None:
        self.clamp_rates_()

    def end_of_epoch(self, density: float, epoch: int) -> dict[str, float]:
        self.update_size_weight(density, epoch)
        if self.in_band(density):
            self.budget_met.fill_(True)
        return {"prune/size_weight": float(self.size_weight)}

    def within_budget(self) -> bool:
        with torch.no_grad():
            return self.in_band(self.density(self.masks()))

    def end_of_search_warning(self) -> str | None:
        if bool(self.budget_met):
            return None
        tol = self.density_tolerance
        return (
            f"HARP's density never ended an epoch in [{self.target - tol:g}, {self.target:g}] (now "
            f"{self.density(self.masks()):.4f}): the best checkpoint only takes epochs within that band, "
            "so there is none. Raise size_loss_weight or search for more epochs."
        )

    # ----------------------------------------------------------------- the schedule
    def update_size_weight(self, density: float, epoch: int) -> None:
        """After epoch ``epoch``: grow the weight linearly until the target is met, then freeze it."""
        if bool(self.size_weight_frozen):
            return
        if self.over_budget(density):
            self.size_above_target.fill_(True)
        elif bool(self.size_above_target):
            self.size_weight_frozen.fill_(True)
            return
        self.size_weight.fill_(self.base_weight * (epoch + 2))

    def over_budget(self, density: float) -> bool:
        """Above the target by more than per-layer rounding (at most half a weight per layer, as HYDRA)."""
        rounding = 0.5 * len(self.names) / sum(s.numel() for _, s in self.items())
        return density > self.target + rounding + 1e-12

    def in_band(self, density: float) -> bool:
        """In ``[target - density_tolerance, target]`` (up to rounding)."""
        return not self.over_budget(density) and density >= self.target - self.density_tolerance - 1e-9
