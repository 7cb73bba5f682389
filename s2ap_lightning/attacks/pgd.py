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
import dataclasses
import numbers
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2ap_lightning.checks import check_range
from s2ap_lightning.models.modes import eval_mode

ModelFn = Callable[[Tensor], Tensor]
NORMS = ("linf", "l2")


@dataclass(frozen=True)
class ThreatModel:
    """An L-inf or L2 PGD threat model: budget ``eps``, ``steps`` steps of ``step_size``.

    One typed value for every attack of the project (training, validation, evaluation), so a budget
    is validated once, here, whoever builds it: a stage from its hyper-parameters, a job from its
    config, a notebook by hand. Field order is the former ``AttackConfig``'s, so positional calls
    ``ThreatModel(eps, step_size, steps, norm)`` keep their meaning.

    Args:
        eps: budget; L-inf budgets are at most 1, since inputs are images in [0, 1] and a larger
            ball allows any image at all.
        step_size: PGD step (L-inf: at most 1, for the same reason).
        steps: PGD steps (>= 1). Evaluations replace it with their own step counts
            (:meth:`with_steps`); it is the training and validation attack's.
        norm: ``linf`` or ``l2``.
        random_start: start PGD at a uniform random point of the ball (else at the clean input);
            deterministic attacks in tests and reproductions turn it off.

    """

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    norm: str = "linf"
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"attack norm={self.norm!r} is unknown; valid: {', '.join(NORMS)}")
        for name in ("eps", "step_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"attack {name}={value!r} must be a number in [0.0, inf)")
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
            raise ValueError(f"attack steps={self.steps!r} must be an integer in [1, inf)")
        # Inputs are images in [0, 1]: an L-inf budget (or step) above 1 allows any image at all.
        high = 1.0 if self.norm == "linf" else None
        check_range("attack eps", self.eps, 0.0, high)
        check_range("attack step_size", self.step_size, 0.0, high)
        check_range("attack steps", self.steps, 1, None)
        if self.norm == "linf" and self.eps > 0 and self.step_size > self.eps:
            warnings.warn(
                f"step_size={self.step_size:g} is larger than eps={self.eps:g}: every PGD step jumps to "
                "the corners of the L-inf ball (common choices: eps/4 for PGD-10, 2.5 * eps / steps)",
                stacklevel=3,
            )

    def with_steps(self, steps: int) -> ThreatModel:
        """The same threat with ``steps`` PGD steps (the evaluation's PGD-50, its weaker PGD-10)."""
        with warnings.catch_warnings():
            # eps and step_size are unchanged: whatever they warrant was said when this one was made.
            warnings.simplefilter("ignore")
            return dataclasses.replace(self, steps=steps)

    def with_eps(self, eps: float) -> ThreatModel:
        """The same attack at budget ``eps`` (eps 0: the check that an attack cannot change a prediction)."""
        return dataclasses.replace(self, eps=eps)

    def describe(self) -> str:
        """One line for logs and records, e.g. ``linf eps 0.1, PGD-10 step 0.025``."""
        start = "" if self.random_start else ", no random start"
        return f"{self.norm} eps {self.eps:g}, PGD-{self.steps} step {self.step_size:g}{start}"


#: The former name of :class:`ThreatModel`, kept so existing code and configs keep working.
AttackConfig = ThreatModel


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
    config: ThreatModel,
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


def pgd_ce(model_fn: ModelFn, x: Tensor, y: Tensor, config: ThreatModel, restarts: int = 1) -> Tensor:
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
