"""Importance scores over a plain model's prunable weights.

The plain model is never modified: no layer is replaced by a "subnet" layer, so its dense
checkpoints load without surgery and the exported pruned model is an ordinary state dict. The
masked network is evaluated with :func:`torch.func.functional_call`, substituting the effective
weights ``w * M(s)`` for the plain ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from s2ap_lightning.models.compiled import masked_forward  # noqa: F401 - this module's public name
from s2ap_lightning.pruning.masks import (
    kept_count,
    largest_feasible_sparsity,
    scaled_score_init,
    straight_through,
    topk_mask,
    topk_masks,
)

#: Pruning scopes of HYDRA's top-k: per layer (the paper's) or one threshold across layers.
SCOPES = ("layer", "global")


def prunable_weight_names(model: nn.Module) -> list[str]:
    """Names of every ``Conv2d`` and ``Linear`` weight (first conv, shortcuts, classifier included).

    Biases and normalisation layers are never pruned.
    """
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names


def exact_zero_fraction(model: nn.Module, weights: Mapping[str, Tensor]) -> float:
    """Share of ``model``'s prunable weights exactly zero in ``weights`` (the mark of a pruned network)."""
    names = [n for n in prunable_weight_names(model) if n in weights]
    total = sum(weights[n].numel() for n in names)
    return sum(int((weights[n] == 0).sum()) for n in names) / total if total else 0.0


def prunable_state_weights(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The prunable weights of a plain state dict (no model at hand): ``Conv2d`` and ``Linear`` weights.

    Recognised by shape, as every exported model is a plain state dict: 4-D or 2-D ``*.weight``
    tensors (BatchNorm and LayerNorm weights are 1-D; a ViT's position embedding is not a ``weight``).
    """
    return {k: v for k, v in state.items() if k.endswith(".weight") and v.dim() in (2, 4)}


def _key(name: str) -> str:
    """ParameterDict keys may not contain dots."""
    return name.replace(".", "__")


class ScoreSet(nn.Module):
    """One real-valued score per prunable weight and the per-layer top-k mask it induces.

    Args:
        model: the plain network whose weights are scored (not registered as a submodule, so the
            scores' state dict holds scores only).
        sparsity: pruned fraction in (0, 1); 0.9 keeps 10 % of every layer (``scope="layer"``, the
            paper's setting) or of the whole network (``scope="global"``).
        scope: ``layer`` (per-layer top-k) or ``global`` (one threshold across layers on scores
            normalised by each layer's RMS, so that layers of different fan-in compare).
        min_layer_keep: with ``global``, the fraction of every layer kept whatever the ranking (at
            least one weight), so that no layer is cut off entirely.

    """

    def __init__(
        self, model: nn.Module, sparsity: float, scope: str = "layer", min_layer_keep: float = 0.0
    ) -> None:
        super().__init__()
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity!r} is out of range: it must lie in (0, 1)")
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} is unknown; valid: {', '.join(SCOPES)}")
        if not 0.0 <= min_layer_keep <= 1.0 - sparsity:
            raise ValueError(
                f"min_layer_keep={min_layer_keep} is out of range: valid range is [0, {1 - sparsity:g}]"
            )
        self.sparsity = sparsity
        self.scope = scope
        self.min_layer_keep = min_layer_keep
        self.names = prunable_weight_names(model)
        params = dict(model.named_parameters())
        self.scores = nn.ParameterDict(
            {_key(n): nn.Parameter(scaled_score_init(params[n])) for n in self.names}
        )
        #: How many times the masks were computed; the benchmark reads it.
        self.mask_computations = 0
        self._check_every_layer_keeps_a_weight()

    def layer_sizes(self) -> dict[str, int]:
        """Number of weights of every prunable layer, in the order of ``names``."""
        return {n: s.numel() for n, s in self.items()}

    def _check_every_layer_keeps_a_weight(self) -> None:
        """Refuse, before any training, a sparsity under which some layer would keep no weight.

        An empty layer cuts the network: it then predicts one class whatever the input, and the
        search would report its accuracy as if it were a result. With ``scope="layer"`` a layer keeps
        ``round((1 - sparsity) * numel)`` weights, so a small layer empties first. With ``"global"``
        every layer keeps at least one weight by construction, but the network-wide budget must then
        cover those minimums, or the masks would silently keep more than the sparsity asked.
        """
        sizes = self.layer_sizes()
        if self.scope == "global":
            total, layers = sum(sizes.values()), len(sizes)

            def enough(sparsity: float) -> bool:
                return kept_count(total, sparsity) >= layers

            if not enough(self.sparsity):
                raise ValueError(
                    f"sparsity={self.sparsity} with scope='global' allows {kept_count(total, self.sparsity)} "
                    f"of {total} weights, fewer than one for each of the {layers} prunable layers; "
                    f"{_largest_clause(enough)}"
                )
            return

        def all_kept(sparsity: float) -> bool:
            return all(kept_count(n, sparsity) >= 1 for n in sizes.values())

        empty = {name: n for name, n in sizes.items() if kept_count(n, self.sparsity) < 1}
        if empty:
            raise ValueError(
                f"sparsity={self.sparsity} leaves {len(empty)} of {len(sizes)} prunable layers with no "
                f"weight (a layer keeps round((1 - sparsity) * size)): {_layer_list(empty)}; "
                f"{_largest_clause(all_kept)}"
            )

    def __getitem__(self, name: str) -> nn.Parameter:
        return self.scores[_key(name)]

    def items(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, self[n]) for n in self.names]

    @torch.no_grad()
    def reinitialise(self, model: nn.Module) -> None:
        """Scaled score init from the model's current weights (after ``init_from`` loaded them)."""
        params = dict(model.named_parameters())
        for name, score in self.items():
            score.copy_(scaled_score_init(params[name]))

    def kept_counts(self) -> dict[str, int]:
        """Per-layer number of kept weights; base methods with learnt rates override this."""
        if self.scope == "global":
            return self._global_counts()
        return {n: kept_count(s.numel(), self.sparsity) for n, s in self.items()}

    @torch.no_grad()
    def _global_counts(self) -> dict[str, int]:
        """One threshold on RMS-normalised ``|s|`` across layers, each layer keeping a minimum."""
        items = self.items()
        total = sum(s.numel() for _, s in items)
        budget = kept_count(total, self.sparsity)
        minimum = {n: min(s.numel(), max(1, round(self.min_layer_keep * s.numel()))) for n, s in items}
        normalised = []
        for name, s in items:
            a = s.detach().abs().flatten()
            a = a / a.pow(2).mean().sqrt().clamp_min(1e-12)
            reserved = torch.topk(a, minimum[name]).indices
            a = a.clone()
            a[reserved] = -1.0  # already kept: not competing for the global budget
            normalised.append(a)
        rest = max(budget - sum(minimum.values()), 0)
        flat = torch.cat(normalised)
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        if rest:
            chosen[torch.topk(flat, rest).indices] = True
        counts, offset = {}, 0
        for (name, _), a in zip(items, normalised, strict=True):
            counts[name] = minimum[name] + int(chosen[offset : offset + a.numel()].sum())
            offset += a.numel()
        return counts

    def masks(self) -> dict[str, Tensor]:
        """Binary masks of the current scores: one top-k per layer."""
        self.mask_computations += 1
        counts = self.kept_counts()
        items = self.items()
        if items and items[0][1].is_cuda:
            # Launch-bound on GPUs: one batched selection instead of a top-k per layer.
            masks = topk_masks([s for _, s in items], [counts[n] for n, _ in items])
            return {n: m for (n, _), m in zip(items, masks, strict=True)}
        return {n: topk_mask(s, counts[n]) for n, s in items}

    def effective_weights(
        self, model: nn.Module, masks: Mapping[str, Tensor], differentiable: bool = True
    ) -> dict[str, Tensor]:
        """``w * M(s)``; with ``differentiable`` the straight-through path to the scores is kept.

        The non-differentiable version is what the attacks use: it carries no graph to the scores,
        so attack iterations cost a plain forward and an input gradient.
        """
        params = dict(model.named_parameters())
        out = {}
        for name, score in self.items():
            weight = params[name].detach()
            mask = masks[name]
            out[name] = weight * (straight_through(mask, score) if differentiable else mask)
        return out

    def weights_at(
        self, model: nn.Module, point: Mapping[str, Tensor], differentiable: bool = True
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(w * M(point), M(point))`` at scores ``point`` (layer name -> tensor).

        The masks come from this method's own rule (HARP's learnt rates included); the stored scores
        are not touched. The analyses (sharpness, landscapes) take the loss at other score points
        through this, so they never re-implement the mask.
        """
        params = {f"scores.{_key(n)}": t for n, t in point.items()}

        def at_point() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
            masks = self.masks()
            return self.effective_weights(model, masks, differentiable), masks

        return functional_call(self, params, (), {"_thunk": at_point}, strict=False)

    def forward(self, _thunk: object = None) -> object:
        # functional_call's entry point: runs ``_thunk`` with the substituted scores (weights_at).
        return _thunk()

    def density(self, masks: Mapping[str, Tensor]) -> float:
        """Fraction of prunable weights kept."""
        kept = sum(float(m.sum()) for m in masks.values())
        return kept / sum(m.numel() for m in masks.values())


def _layer_list(layers: Mapping[str, int]) -> str:
    """``name (size weights)`` for each layer, comma-separated, for one-line error messages."""
    return ", ".join(f"{name} ({n} weights)" for name, n in layers.items())


def _largest_clause(feasible: Callable[[float], bool]) -> str:
    """The end of an empty-layer error: the largest sparsity that keeps a weight in every layer."""
    best = largest_feasible_sparsity(feasible)
    if best is None:
        return "no sparsity keeps at least one weight in every layer"
    return f"the largest sparsity that keeps at least one weight in every layer is {best:g}"


#: Which scalar HARP's summed mask gradient is the gradient of (see :class:`HarpScoreSet`).
RATE_GRADS = ("logit", "keep")


class HarpScoreSet(ScoreSet):
    """HARP: scores plus one learnable rate per layer that sets that layer's keep fraction.

    ``k_l = k_min + (1 - k_min) * sigmoid(r_l)`` with ``k_min = 0.1 * k_target``; the rates start where
    every layer keeps the target fraction. The rate gradient is the sum of that layer's score
    gradients as the straight-through estimator passes them to the ranked values ``|s|``, i.e. of
    ``dL/dM = w * dL/dw_eff``: the first-order change of the loss when every mask entry of the layer
    grows, which is what raising the keep rate does. (Summing ``dL/ds = sign(s) * dL/dM`` instead
    would weigh each entry by the sign of its score, which says nothing about keeping more weights.)

    Which scalar receives that sum is ``rate_grad``:

    - ``"logit"`` (default; the method reference's wording: the learnable scalar ``r_l``'s gradient
      is the sum): a straight-through step over the sigmoid as well. The size loss still reaches
      ``r_l`` through the sigmoid, so it pulls hardest where the layer is near its middle rate.
    - ``"keep"`` (HARP's code): the keep fraction ``k_l``; autograd carries it through the sigmoid,
      so both losses act on ``r_l`` scaled by the same slope. Where the robust loss's sum favours
      fewer weights, the hinge-shaped size loss cannot pull the density back up to the target.
      How both readings behaved in runs: ``benchmarks/README.md`` (HARP's density).

    The effective weight carries a ``w * (x - x.detach())`` term (``x`` the chosen scalar) whose value
    is exactly zero.

    ``rate_bound`` clamps every rate to ``[-rate_bound, rate_bound]`` after each step (``None``: no
    clamp, as HARP's code). The sum makes one step of a large layer's rate big enough to push the
    sigmoid into saturation, where its slope, and with it the size loss's pull, is zero: the layer then
    stays dense for the rest of the search. At the default bound of 6 the slope is still 1 % of its
    maximum, and the keep fraction spans ``k_min + (1 - k_min) * [0.0025, 0.9975]``.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        rate_grad: str = "logit",
        rate_bound: float | None = 6.0,
        **kwargs: object,
    ) -> None:
        super().__init__(model, sparsity, **kwargs)
        if rate_grad not in RATE_GRADS:
            raise ValueError(f"rate_grad={rate_grad!r} is unknown; valid: {', '.join(RATE_GRADS)}")
        self.rate_grad = rate_grad
        if rate_bound is not None and rate_bound <= 0:
            raise ValueError(f"rate_bound={rate_bound} is out of range: valid are > 0, or None (no clamp)")
        self.rate_bound = rate_bound
        self.target = 1.0 - sparsity
        self.k_min = 0.1 * self.target
        start = (self.target - self.k_min) / (1.0 - self.k_min)
        logit = float(torch.logit(torch.tensor(start)))
        self.rates = nn.ParameterDict({_key(n): nn.Parameter(torch.tensor(logit)) for n in self.names})
        self._check_rates_keep_a_weight()

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

    def _check_rates_keep_a_weight(self) -> None:
        """Refuse a sparsity at which a learnt rate could empty a layer (checked before training).

        :class:`ScoreSet` has checked the starting counts; here the floor the rates can reach (see
        :meth:`lowest_keep_fraction`) is checked too, since a layer emptied in the middle of the
        search cuts the network just as one emptied from the start.
        """
        sizes = self.layer_sizes()

        def counts(sparsity: float) -> dict[str, int]:
            return {name: int(round(self.lowest_keep_fraction(sparsity) * n)) for name, n in sizes.items()}

        def all_kept(sparsity: float) -> bool:
            return min(counts(sparsity).values()) >= 1

        empty = {name: sizes[name] for name, k in counts(self.sparsity).items() if k < 1}
        if empty:
            raise ValueError(
                f"base_method='harp' at sparsity={self.sparsity} with rate_bound={self.rate_bound} can "
                f"lower a layer's keep fraction to {self.lowest_keep_fraction(self.sparsity):.3g}, which "
                f"leaves {len(empty)} of {len(sizes)} prunable layers with no weight: {_layer_list(empty)}; "
                f"{_largest_clause(all_kept)} (or bound the rates with rate_bound)"
            )

    def keep_fraction(self, name: str) -> Tensor:
        return self.k_min + (1.0 - self.k_min) * torch.sigmoid(self.rates[_key(name)])

    def kept_counts(self) -> dict[str, int]:
        return {n: int(round(float(self.keep_fraction(n).detach()) * s.numel())) for n, s in self.items()}

    def effective_weights(
        self, model: nn.Module, masks: Mapping[str, Tensor], differentiable: bool = True
    ) -> dict[str, Tensor]:
        out = super().effective_weights(model, masks, differentiable)
        if differentiable:
            params = dict(model.named_parameters())
            for name in self.names:
                x = self.rates[_key(name)] if self.rate_grad == "logit" else self.keep_fraction(name)
                out[name] = out[name] + params[name].detach() * (x - x.detach())

        return out

    @torch.no_grad()
    def clamp_rates_(self) -> None:
        """Keep the rates where the sigmoid still responds (see ``rate_bound``); after every step."""
        if self.rate_bound is not None:
            for rate in self.rates.values():
                rate.clamp_(-self.rate_bound, self.rate_bound)

    def expected_density(self) -> Tensor:
        """Differentiable density implied by the rates (what the size loss sees)."""
        total = sum(s.numel() for _, s in self.items())
        return sum(self.keep_fraction(n) * s.numel() for n, s in self.items()) / total

    def size_loss(self) -> Tensor:
        """``max(density / k_target - 1, 0)``."""
        return torch.relu(self.expected_density() / self.target - 1.0)
