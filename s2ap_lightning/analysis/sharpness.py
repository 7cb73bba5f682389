"""Score-space sharpness: the top Hessian eigenvalue and the worst-case loss increase.

Both measure how sharply the robust loss of the masked network reacts to the scores, the quantity
S2AP minimises. Adversarial examples are crafted once and kept fixed, the model is in eval mode
(BatchNorm uses running statistics) and a fixed subset of images is used, so two checkpoints are
compared on the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from s2ap_lightning.analysis.objective import SearchObjective, fixed_adversarial, robust_loss_at
from s2ap_lightning.attacks.pgd import eval_mode
from s2ap_lightning.pruning.perturbation import score_perturbation


@dataclass
class EigenResult:
    """Largest-magnitude Hessian eigenvalue, the iterations used and whether it converged."""

    value: float
    iterations: int
    converged: bool


def hessian_max_eigenvalue(
    loss_fn: Callable[[Sequence[Tensor]], Tensor],
    params: Sequence[Tensor],
    max_iter: int = 50,
    tol: float = 1e-3,
    seed: int = 0,
) -> EigenResult:
    """Power iteration on Hessian-vector products of ``loss_fn`` at ``params``.

    Args:
        loss_fn: scalar function of tensors shaped like ``params`` (twice differentiable).
        params: the point at which the Hessian is taken (not modified).
        max_iter: iteration cap.
        tol: stop when the relative change of the eigenvalue estimate falls below it.
        seed: seed of the random start vector.

    """
    point = [p.detach().clone().requires_grad_(True) for p in params]
    loss = loss_fn(point)
    grads = torch.autograd.grad(loss, point, create_graph=True)
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = [torch.randn(p.shape, generator=g).to(p) for p in point]
    norm = torch.sqrt(sum((x * x).sum() for x in v))
    v = [x / norm for x in v]
    value, converged, it = 0.0, False, 0
    for it in range(1, max_iter + 1):
        hv = torch.autograd.grad(grads, point, grad_outputs=v, retain_graph=True)
        new_value = float(sum((a * b).sum() for a, b in zip(hv, v, strict=True)))
        norm = torch.sqrt(sum((x * x).sum() for x in hv))
        if float(norm) == 0.0:
            value, converged = 0.0, True
            break
        v = [x / norm for x in hv]
        if it > 1 and abs(new_value - value) <= tol * max(abs(value), 1e-12):
            value, converged = new_value, True
            break
        value = new_value
    return EigenResult(value, it, converged)


@dataclass
class SharpnessReport:
    lambda_max: float
    iterations: int
    converged: bool
    loss: float
    worst_loss: float
    sharpness: float
    rho: float
    n_images: int

    def as_dict(self) -> dict:
        return asdict(self)


def score_space_sharpness(
    objective: SearchObjective,
    x: Tensor,
    y: Tensor,
    rho: float = 0.01,
    max_iter: int = 50,
    tol: float = 1e-3,
    seed: int = 0,
) -> SharpnessReport:
    """Top Hessian eigenvalue of the robust loss w.r.t. the scores, and the direct sharpness.

    The direct sharpness is ``L(s + z) - L(s)`` with ``z`` S2AP's one-step worst per-layer
    perturbation of relative budget ``rho`` (the sharpness radius, named apart from the search's own
    S2AP radius ``gamma``, which it often equals). ``objective`` is the search's (``pruner.objective()``): its
    model, base method, robust loss and training adversary. Adversarial examples: that loss's own
    attack on the masked model at ``s``, crafted once.
    """
    model = objective.model
    current = [(n, s.detach()) for n, s in objective.method.items()]
    names = [n for n, _ in current]
    x_adv = fixed_adversarial(objective, x, y, seed)
    with eval_mode(model):

        def robust_loss(score_list: Sequence[Tensor]) -> Tensor:
            point = dict(zip(names, score_list, strict=True))
            return robust_loss_at(objective, point, x, x_adv, y)[0]

        with torch.enable_grad():
            eig = hessian_max_eigenvalue(robust_loss, [s for _, s in current], max_iter, tol, seed)
            point = [s.clone().requires_grad_(True) for _, s in current]
            loss = robust_loss(point)
            grads = torch.autograd.grad(loss, point)
        z = score_perturbation(
            dict(zip(names, point, strict=True)), dict(zip(names, grads, strict=True)), rho
        )
        with torch.no_grad():
            worst = robust_loss([p + z[n] for n, p in zip(names, point, strict=True)])
    return SharpnessReport(
        eig.value,
        eig.iterations,
        eig.converged,
        float(loss.detach()),
        float(worst),
        float(worst - loss.detach()),
        rho,
        len(x),
    )
