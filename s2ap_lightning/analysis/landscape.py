"""Loss landscapes in score space: 1-D and 2-D slices along random directions.

Each layer's direction is scaled to that layer's score norm ``||s_l||`` (filter-normalisation in the
spirit of Li et al.), so a step of 1 moves every layer by its own size. Along the path the mask
changes: the number of mask flips relative to ``s`` is recorded beside the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from s2ap_lightning.analysis.objective import SearchObjective, fixed_adversarial, robust_loss_at
from s2ap_lightning.analysis.plotting import subplots
from s2ap_lightning.attacks.pgd import eval_mode


def random_direction(scores: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """A Gaussian direction with every layer rescaled to that layer's score norm."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in scores.items():
        d = torch.randn(s.shape, generator=g).to(s)
        out[name] = d * (s.norm() / d.norm().clamp_min(1e-12))
    return out


@dataclass
class Landscape:
    """Loss (and mask flips) on a grid of steps ``alphas`` (x) and ``betas`` (y, 2-D only)."""

    alphas: list[float]
    betas: list[float] | None
    loss: np.ndarray
    flips: np.ndarray
    meta: dict = field(default_factory=dict)

    def save(self, path_prefix: str) -> None:
        np.savez(
            f"{path_prefix}.npz",
            alphas=np.array(self.alphas),
            betas=np.array(self.betas if self.betas is not None else []),
            loss=self.loss,
            flips=self.flips,
        )

    def plot(self, path: str, title: str = "") -> None:
        if self.betas is None:
            fig, ax = subplots(figsize=(5, 3.5))
            ax.plot(self.alphas, self.loss, marker="o", label="robust loss")
            ax.set_xlabel("step along a random score direction (x ||s_l||)")
            ax.set_ylabel("robust loss")
            ax2 = ax.twinx()
            ax2.plot(self.alphas, self.flips, color="tab:red", alpha=0.6, label="mask flips")
            ax2.set_ylabel("mask flips vs s", color="tab:red")
        else:
            fig, ax = subplots(figsize=(5, 4))
            c = ax.contourf(self.alphas, self.betas, self.loss.T, levels=20)
            fig.colorbar(c, ax=ax, label="robust loss")
            ax.set_xlabel("direction 1")
            ax.set_ylabel("direction 2")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)


def _current_scores(objective: SearchObjective) -> dict[str, Tensor]:
    """The scores ``s`` the slices are centred on, cut from the graph (no analysis trains them)."""
    return {n: s.detach() for n, s in objective.method.items()}


def _grid_loss(
    objective: SearchObjective, x: Tensor, x_adv: Tensor, y: Tensor, offsets: list[dict[str, Tensor]]
) -> tuple[list[float], list[int]]:
    """The search's robust loss at ``s + offset`` (masks by the base method) and the mask flips."""
    scores = _current_scores(objective)
    with torch.no_grad(), eval_mode(objective.model):
        base = objective.method.masks()
        losses, flips = [], []
        for off in offsets:
            point = {n: s + off[n] for n, s in scores.items()}
            loss, masks = robust_loss_at(objective, point, x, x_adv, y, differentiable=False)
            losses.append(float(loss))
            flips.append(sum(int((masks[n] != base[n]).sum()) for n in scores))
    return losses, flips


def landscape_1d(
    objective: SearchObjective,
    x: Tensor,
    y: Tensor,
    alphas: Sequence[float] = tuple(np.linspace(-1, 1, 21)),
    seed: int = 0,
) -> Landscape:
    """Robust loss of ``w * M(s + a * d)`` for a random per-layer-normalised direction ``d``.

    ``objective`` is the search's (``pruner.objective()``); its loss is taken on adversarial
    examples crafted once at ``s``, so the slice shows the scores' effect alone.
    """
    x_adv = fixed_adversarial(objective, x, y, seed)
    scores = _current_scores(objective)
    d = random_direction(scores, seed)
    offsets = [{n: a * d[n] for n in scores} for a in alphas]
    loss, flips = _grid_loss(objective, x, x_adv, y, offsets)
    return Landscape(list(map(float, alphas)), None, np.array(loss), np.array(flips), {"n_images": len(x)})


def landscape_2d(
    objective: SearchObjective,
    x: Tensor,
    y: Tensor,
    alphas: Sequence[float] = tuple(np.linspace(-1, 1, 11)),
    betas: Sequence[float] | None = None,
    seed: int = 0,
) -> Landscape:
    """Robust loss on the plane spanned by two random per-layer-normalised directions.

    As :func:`landscape_1d`; ``betas`` (default: ``alphas``) are the steps along the second one.
    """
    betas = list(alphas) if betas is None else list(betas)
    x_adv = fixed_adversarial(objective, x, y, seed)
    scores = _current_scores(objective)
    d1, d2 = random_direction(scores, seed), random_direction(scores, seed + 1)
    offsets = [{n: a * d1[n] + b * d2[n] for n in scores} for a in alphas for b in betas]
    loss, flips = _grid_loss(objective, x, x_adv, y, offsets)
    shape = (len(alphas), len(betas))
    return Landscape(
        list(map(float, alphas)),
        list(map(float, betas)),
        np.array(loss).reshape(shape),
        np.array(flips).reshape(shape),
        {"n_images": len(x)},
    )
