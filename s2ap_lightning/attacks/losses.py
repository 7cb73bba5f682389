"""Robust training objectives: PGD-AT, TRADES and MART.

Each loss knows how to craft its own adversarial examples (TRADES attacks its KL term, the others
cross-entropy) and how to score a batch given them, so every stage can switch loss by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2ap_lightning.attacks.pgd import ModelFn, ThreatModel, attack_context, pgd


@dataclass
class LossOutput:
    """The training loss and the logits it saw (for accuracy metrics without an extra forward)."""

    loss: Tensor
    logits_adv: Tensor
    logits_clean: Tensor | None = None


class RobustLoss:
    """Base class: subclasses implement :meth:`adversarial` and :meth:`__call__`."""

    name = "base"

    def adversarial(
        self,
        model_fn: ModelFn,
        x: Tensor,
        y: Tensor,
        config: ThreatModel,
        *modules: nn.Module,
        autocast: bool = False,
    ) -> Tensor:
        """Adversarial examples for this loss; ``autocast`` keeps the caller's autocast (training only)."""
        raise NotImplementedError

    def __call__(self, model_fn: ModelFn, x: Tensor, x_adv: Tensor, y: Tensor) -> LossOutput:
        raise NotImplementedError


class PGDATLoss(RobustLoss):
    """Madry et al.: cross-entropy on PGD examples that maximise cross-entropy."""

    name = "pgd_at"

    def adversarial(self, model_fn, x, y, config, *modules, autocast=False):
        with attack_context(*modules, autocast=autocast):
            return pgd(model_fn, x, lambda z: F.cross_entropy(z, y, reduction="sum"), config)

    def __call__(self, model_fn, x, x_adv, y):
        logits_adv = model_fn(x_adv)
        return LossOutput(F.cross_entropy(logits_adv, y), logits_adv)


class TRADESLoss(RobustLoss):
    """Zhang et al.: ``CE(f(x), y) + beta * KL(f(x_adv) || f(x))``; the attack maximises the KL."""

    name = "trades"

    def __init__(self, beta: float = 6.0) -> None:
        self.beta = beta

    def adversarial(self, model_fn, x, y, config, *modules, autocast=False):
        with attack_context(*modules, autocast=autocast):
            with torch.no_grad():
                p_clean = F.softmax(model_fn(x).float(), dim=1)

            def kl(logits: Tensor) -> Tensor:
                return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")

            start = x + 0.001 * torch.randn_like(x) if config.random_start else None
            return pgd(model_fn, x, kl, config, start=start)

    def __call__(self, model_fn, x, x_adv, y):
        logits_clean = model_fn(x)
        logits_adv = model_fn(x_adv)
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
        loss = F.cross_entropy(logits_clean, y) + self.beta * kl
        return LossOutput(loss, logits_adv, logits_clean)


class MARTLoss(RobustLoss):
    """Wang et al.: boosted CE on adversarial examples plus a KL term weighted by misclassification."""

    name = "mart"

    def __init__(self, beta: float = 6.0) -> None:
        self.beta = beta

    adversarial = PGDATLoss.adversarial

    def __call__(self, model_fn, x, x_adv, y):
        logits_clean = model_fn(x)
        logits_adv = model_fn(x_adv)
        probs_adv = F.softmax(logits_adv, dim=1)
        top2 = torch.argsort(probs_adv, dim=1)[:, -2:]
        runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
        boosted = F.cross_entropy(logits_adv, y) + F.nll_loss(
            torch.log(1.0001 - probs_adv + 1e-12), runner_up
        )
        probs_clean = F.softmax(logits_clean, dim=1)
        true_probs = probs_clean.gather(1, y.unsqueeze(1)).squeeze(1)
        kl = F.kl_div(torch.log(probs_adv + 1e-12), probs_clean, reduction="none").sum(1)
        loss = boosted + self.beta * (kl * (1.0000001 - true_probs)).mean()
        return LossOutput(loss, logits_adv, logits_clean)


ROBUST_LOSSES = ("pgd_at", "trades", "mart")


def build_robust_loss(name: str, beta: float = 6.0) -> RobustLoss:
    """Robust loss by name (``pgd_at``, ``trades`` or ``mart``)."""
    if name == "pgd_at":
        return PGDATLoss()
    if name == "trades":
        return TRADESLoss(beta)
    if name == "mart":
        return MARTLoss(beta)
    raise ValueError(f"unknown robust_loss {name!r}; valid: {', '.join(ROBUST_LOSSES)}")
