"""Projected gradient descent on the inputs.

Attacks never touch the model's parameters: gradients are taken with ``torch.autograd.grad`` with
respect to the input only, with the model in eval mode, and they work inside Lightning's validation
and test loops, which run under ``torch.inference_mode``. They run in fp32 with autocast off, except
training attacks whose stage asks for ``attack_precision: training``: those keep the caller's
autocast (bf16 under ``bf16-mixed``), as fast adversarial training commonly does. The perturbation
itself, the projection and the returned examples are fp32 either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2ap_lightning.models.modes import eval_mode

ModelFn = Callable[[Tensor], Tensor]
NORMS = ("linf", "l2")


@dataclass(frozen=True)
class AttackConfig:
    """An L-inf or L2 PGD threat model: budget ``eps``, ``steps`` steps of ``step_size``."""

    eps: float
    step_size: float
    steps: int
    norm: str = "linf"
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"attack norm={self.norm!r} is unknown; valid: {', '.join(NORMS)}")
        if self.eps < 0:
            raise ValueError(f"attack eps={self.eps} must be >= 0")
        if self.step_size < 0:
            raise ValueError(f"attack step_size={self.step_size} must be >= 0")
        if self.steps < 1:
            raise ValueError(f"attack steps={self.steps} must be >= 1")


@contextlib.contextmanager
def attack_context(*modules: nn.Module, autocast: bool = False) -> Iterator[None]:
    """Everything an attack needs: gradients on, inference mode off, eval mode, autocast off.

    Args:
        *modules: put in eval mode for the attack (their own flags are restored afterwards).
        autocast: keep the caller's autocast instead of forcing fp32 (training attacks under
            ``attack_precision: training`` only; evaluation attacks never pass it).

    """
    with contextlib.ExitStack() as stack:
        if not autocast:
            # Both device types: a CPU run on a machine with a GPU has CPU autocast on.
            for device_type in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(eval_mode(*modules))
        yield


def _l2_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    factor = (eps / _l2_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * factor


def _random_delta(x: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return torch.empty_like(x).uniform_(-eps, eps)
    direction = torch.randn_like(x)
    direction = direction / _l2_norm(direction).clamp_min(1e-12)
    radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
    return direction * radius * eps


def pgd(
    model_fn: ModelFn,
    x: Tensor,
    objective: Callable[[Tensor], Tensor],
    config: AttackConfig,
    start: Tensor | None = None,
) -> Tensor:
    """Maximise ``objective(model_fn(x_adv))`` within the ball; returns detached ``x_adv`` in [0, 1].

    Args:
        model_fn: logits of a batch; called in whatever mode the caller set (use
            :func:`attack_context`).
        x: clean inputs in [0, 1].
        objective: scalar to maximise, a function of the logits (cross-entropy for PGD-AT, the KL
            term for TRADES).
        config: the threat model.
        start: optional starting point (TRADES starts at ``x + 0.001 * N(0, 1)``); otherwise a
            uniform random start in the ball, or ``x`` itself without ``random_start``.

    """
    x = x.detach().float()
    if start is not None:
        delta = start.detach().float() - x
    elif config.random_start:
        delta = _random_delta(x, config.eps, config.norm)
    else:
        delta = torch.zeros_like(x)
    x_adv = (x + _project(delta, config.eps, config.norm)).clamp(0.0, 1.0)
    for _ in range(config.steps):
        x_adv.requires_grad_(True)
        loss = objective(model_fn(x_adv).float())
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            if config.norm == "linf":
                step = config.step_size * grad.sign()
            else:
                step = config.step_size * grad / _l2_norm(grad).clamp_min(1e-12)
            delta = _project(x_adv + step - x, config.eps, config.norm)
            x_adv = (x + delta).clamp(0.0, 1.0)
    return x_adv.detach()


def pgd_ce(model_fn: ModelFn, x: Tensor, y: Tensor, config: AttackConfig, restarts: int = 1) -> Tensor:
    """Cross-entropy PGD; with restarts, each sample keeps the first restart that fools the model."""
    if restarts < 1:
        raise ValueError(f"restarts={restarts} must be >= 1")
    best: Tensor | None = None
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        x_adv = pgd(model_fn, x, lambda logits: F.cross_entropy(logits, y, reduction="sum"), config)
        with torch.no_grad():
            wrong = model_fn(x_adv).argmax(1) != y
        if best is None:
            best = x_adv
        else:
            take = wrong & ~fooled
            best[take] = x_adv[take]
        fooled |= wrong
        if bool(fooled.all()):
            break
    return best
