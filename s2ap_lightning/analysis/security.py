"""Security curves from minimum-norm perturbations (FMN, through secml-torch).

FMN finds, per image, the smallest perturbation that changes the prediction; robust accuracy at any
budget ``eps`` is then the share of images that are correct and need more than ``eps``. One attack
run gives the whole curve, as in the adversarial pruning benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from s2ap_lightning.analysis.plotting import subplots
from s2ap_lightning.attacks.pgd import attack_context


@dataclass
class SecurityCurve:
    eps: list[float]
    robust_acc: list[float]
    distances: list[float]  # per image; inf where FMN found no adversarial example; 0 if misclassified
    norm: str

    def accuracy_at(self, eps: float) -> float:
        d = np.asarray(self.distances)
        return float((d > eps).mean())

    def plot(self, path: str, title: str = "") -> None:
        fig, ax = subplots(figsize=(5, 3.5))
        ax.plot(self.eps, self.robust_acc, marker=".")
        ax.set_xlabel(f"perturbation budget eps ({self.norm})")
        ax.set_ylabel("robust accuracy")
        ax.set_ylim(0, 1)
        ax.set_title(title or "security curve (FMN)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)


def minimum_norm_distances(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    norm: str = "linf",
    steps: int = 100,
    step_size: float | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Per-image L-p size of FMN's smallest adversarial perturbation (0 if already wrong)."""
    # secml-torch is only needed by the security curve
    from secmlt.adv.evasion.fmn import FMN
    from secmlt.models.pytorch.base_pytorch_nn import BasePyTorchClassifier

    p = {"linf": float("inf"), "l2": 2.0}[norm]
    step_size = step_size if step_size is not None else (0.1 if norm == "linf" else 1.0)
    attack = FMN(perturbation_model=norm, num_steps=steps, step_size=step_size, backend="native")
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    with attack_context(model):
        classifier = BasePyTorchClassifier(model)
        adv_loader = attack(classifier, loader)
        x_adv = torch.cat([b[0] for b in adv_loader]).to(x.device)
        with torch.no_grad():
            wrong_clean = model(x).argmax(1) != y
            fooled = model(x_adv).argmax(1) != y
    dist = (x_adv - x).flatten(1).norm(p=p, dim=1).cpu().numpy()
    dist[~fooled.cpu().numpy()] = np.inf
    dist[wrong_clean.cpu().numpy()] = 0.0
    return dist


def security_curve(
    model: nn.Module, x: Tensor, y: Tensor, eps_grid: Sequence[float], norm: str = "linf", steps: int = 100
) -> SecurityCurve:
    """Robust accuracy against eps from one FMN run."""
    d = minimum_norm_distances(model, x, y, norm, steps)
    acc = [float((d > e).mean()) for e in eps_grid]
    return SecurityCurve(list(map(float, eps_grid)), acc, d.tolist(), norm)
