"""HARP: learnt per-layer keep rates pushed to the density target by a scheduled size loss.

Everything HARP-specific lives here: the options (:class:`Harp`), the rates, keep fractions, size
loss, rate clamp and the density bookkeeping of the size-loss schedule and the budget
(:class:`HarpState`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from s2ap_lightning.checks import check_range
from s2ap_lightning.pruning.methods.base import BaseMethod, MethodState
from s2ap_lightning.pruning.scores import check_layers_keep_a_weight, largest_clause, layer_list, score_key

#: Which scalar HARP's summed mask gradient is the gradient of (see :class:`Harp`).
RATE_GRADS = ("logit", "keep")


class Harp(BaseMethod):
    """HARP: scores plus one learnable rate per layer that sets that layer's keep fraction.

    ``k_l = k_min + (1 - k_min) * sigmoid(r_l)`` with ``k_min = 0.1 * k_target``; the rates start where
    every layer keeps the target fraction. The rate gradient is the sum of that layer's score
    gradients as the straight-through estimator passes them to the ranked values ``|s|``, i.e. of
    ``dL/dM = w * dL/dw_eff``: the first-order change of the loss when every mask entry of the layer
    grows, which is what raising the keep rate does. (Summing ``dL/ds = sign(s) * dL/dM`` instead
    would weigh each entry by the sign of its score, which says nothing about keeping more weights.)
    The effective weight carries a ``w * (x - x.detach())`` term (``x`` the scalar chosen by
    ``rate_grad``) whose value is exactly zero.

    Args:
        size_loss_weight: the size loss ``max(density / k_target - 1, 0)`` is weighted by
            ``size_loss_weight * (epoch + 1)`` in epoch ``epoch`` (from 0), HARP's step-wise
            incremental weight, until the density target is met; from then on the weight stays.
            HARP's own runs use 0.01 (CIFAR-10) and 0.1 (ImageNet); 1.0 is the default of HARP's code.
        rate_grad: which scalar receives the summed mask gradient. ``logit`` (default; the method
            reference's wording: the learnable ``r_l``'s gradient is the sum) is a straight-through
            step over the sigmoid as well; the size loss still reaches ``r_l`` through the sigmoid,
            so it pulls hardest where the layer is near its middle rate. ``keep`` (HARP's code) is
            the keep fraction ``k_l``, so both losses act on ``r_l`` scaled by the same slope; where
            the robust loss's sum favours fewer weights, the hinge-shaped size loss cannot pull the
            density back up to the target (``benchmarks/README.md``, HARP's density).
        rate_bound: every rate is clamped to ``[-rate_bound, rate_bound]`` after each step (None:
            no clamp, as HARP's code). The sum makes one step of a large layer's rate big enough to
            push the sigmoid into saturation, where its slope, and with it the size loss's pull, is
            zero: the layer would stay dense for the rest of the search. At the default 6 the slope
            is still 1 % of its maximum, and the keep fraction spans
            ``k_min + (1 - k_min) * [0.0025, 0.9975]``.
        density_tolerance: ``best.ckpt`` only from epochs whose density is in
            ``[target - density_tolerance, target]`` (never over the budget, as HARP selects).

    No option defines the mask beyond the sparsity: the mask follows from the learnt scores and
    rates, which the checkpoint holds.

    """

    name = "harp"
    mask_defining = ()

    def __init__(
        self,
        size_loss_weight: float = 1.0,
        rate_grad: Literal["logit", "keep"] = "logit",
        rate_bound: float | None = 6.0,
        density_tolerance: float = 0.005,
    ) -> None:
        check_range("size_loss_weight", size_loss_weight, 0.0, None)
        if rate_grad not in RATE_GRADS:
            raise ValueError(f"rate_grad={rate_grad!r} is unknown; valid: {', '.join(RATE_GRADS)}")
        if rate_bound is not None:  # None: no clamp
            check_range("rate_bound", rate_bound, 0.0, None, low_open=True)
        check_range("density_tolerance", density_tolerance, 0.0, 1.0)
        self.size_loss_weight = float(size_loss_weight)
        self.rate_grad = rate_grad
        self.rate_bound = None if rate_bound is None else float(rate_bound)
        self.density_tolerance = float(density_tolerance)

    def lowest_keep_fraction(self, sparsity: float) -> float:
        """The smallest keep fraction a layer's rate can reach during the search at ``sparsity``.

        The rates start at the target ``1 - sparsity``; a bounded rate cannot go below
        ``-rate_bound`` (after every step), an unbounded one approaches ``k_min = 0.1 * target``.
        """
        target = 1.0 - sparsity
        k_min = 0.1 * target
        if self.rate_bound is None:
            return k_min
        return min(target, k_min + (1.0 - k_min) / (1.0 + math.exp(self.rate_bound)))

    def build(self, model: nn.Module, sparsity: float) -> HarpState:
        return HarpState(self, model, sparsity)


class HarpState(MethodState):
    """HARP built over a model: scores, one rate per layer, and the size-loss schedule's state.

    State-dict keys: ``scores.<layer key>``, ``rates.<layer key>`` (one 0-d logit per layer),
    ``size_weight`` (float), ``size_weight_frozen``, ``size_above_target`` and ``budget_met``
    (bools). The schedule lives in buffers, so a resumed search continues it. The rates start *at*
    the target, so "met" means back at or under it after having exceeded it (the robust loss first
    pulls the rates up); HARP's runs start above the target, where the two readings agree.
    """

    method: Harp

    def __init__(self, method: Harp, model: nn.Module, sparsity: float) -> None:
        super().__init__(method, model, sparsity)
        check_layers_keep_a_weight(self.layer_sizes(), sparsity)  # every layer starts at the target
        self.target = 1.0 - sparsity
        self.k_min = 0.1 * self.target
        start = (self.target - self.k_min) / (1.0 - self.k_min)
        logit = float(torch.logit(torch.tensor(start)))
        self.rates = nn.ParameterDict({score_key(n): nn.Parameter(torch.tensor(logit)) for n in self.names})
        self._check_rates_keep_a_weight()
        self.register_buffer("size_weight", torch.tensor(method.size_loss_weight))
        self.register_buffer("size_weight_frozen", torch.tensor(False))
        self.register_buffer("size_above_target", torch.tensor(False))
        self.register_buffer("budget_met", torch.tensor(False))

    def _check_rates_keep_a_weight(self) -> None:
        """Refuse a sparsity at which a learnt rate could empty a layer (checked before training).

        The starting counts are checked already; here the floor the rates can reach
        (:meth:`Harp.lowest_keep_fraction`) is checked too, since a layer emptied in the middle of
        the search cuts the network just as one emptied from the start.
        """
        sizes = self.layer_sizes()
        lowest = self.method.lowest_keep_fraction

        def counts(sparsity: float) -> dict[str, int]:
            return {name: int(round(lowest(sparsity) * n)) for name, n in sizes.items()}

        def all_kept(sparsity: float) -> bool:
            return min(counts(sparsity).values()) >= 1

        empty = {name: sizes[name] for name, k in counts(self.sparsity).items() if k < 1}
        if empty:
            raise ValueError(
                f"method 'harp' at sparsity={self.sparsity} with rate_bound={self.method.rate_bound} can "
                f"lower a layer's keep fraction to {lowest(self.sparsity):.3g}, which leaves "
                f"{len(empty)} of {len(sizes)} prunable layers with no weight: {layer_list(empty)}; "
                f"{largest_clause(all_kept)} (or bound the rates with rate_bound)"
            )

    # ----------------------------------------------------------------- rates and masks
    def keep_fraction(self, name: str) -> Tensor:
        """``k_min + (1 - k_min) * sigmoid(r)`` of layer ``name`` (differentiable in its rate)."""
        return self.k_min + (1.0 - self.k_min) * torch.sigmoid(self.rates[score_key(name)])

    def kept_counts(self) -> dict[str, int]:
        return {n: int(round(float(self.keep_fraction(n).detach()) * s.numel())) for n, s in self.items()}

    def effective_weights(
        self, model: nn.Module, masks: Mapping[str, Tensor], differentiable: bool = True
    ) -> dict[str, Tensor]:
        out = super().effective_weights(model, masks, differentiable)
        if differentiable:
            params = dict(model.named_parameters())
            for name in self.names:
                x = (
                    self.rates[score_key(name)]
                    if self.method.rate_grad == "logit"
                    else self.keep_fraction(name)
                )
                out[name] = out[name] + params[name].detach() * (x - x.detach())
        return out

    @torch.no_grad()
    def clamp_rates_(self) -> None:
        """Keep the rates where the sigmoid still responds (see ``rate_bound``); after every step."""
        bound = self.method.rate_bound
        if bound is not None:
            for rate in self.rates.values():
                rate.clamp_(-bound, bound)

    def expected_density(self) -> Tensor:
        """Differentiable density implied by the rates (what the size loss sees)."""
        total = sum(s.numel() for _, s in self.items())
        return sum(self.keep_fraction(n) * s.numel() for n, s in self.items()) / total

    def size_loss(self) -> Tensor:
        """``max(density / k_target - 1, 0)``."""
        return torch.relu(self.expected_density() / self.target - 1.0)

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
        tol = self.method.density_tolerance
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
        self.size_weight.fill_(self.method.size_loss_weight * (epoch + 2))

    def over_budget(self, density: float) -> bool:
        """Above the target by more than per-layer rounding (at most half a weight per layer, as HYDRA)."""
        rounding = 0.5 * len(self.names) / sum(s.numel() for _, s in self.items())
        return density > self.target + rounding + 1e-12

    def in_band(self, density: float) -> bool:
        """In ``[target - density_tolerance, target]`` (up to rounding)."""
        tolerance = self.method.density_tolerance
        return not self.over_budget(density) and density >= self.target - tolerance - 1e-9
