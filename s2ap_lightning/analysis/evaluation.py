"""Robust accuracy of a plain network: clean, PGD and AutoAttack.

Evaluation works on plain ``nn.Module``s: an exported pruned model, a finetuned model, or the
pretrained weights under a searched mask (:class:`MaskedModel`), so what is measured is exactly the
artefact a user ships.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from s2ap_lightning.attacks.pgd import AttackConfig, attack_context, pgd_ce
from s2ap_lightning.pruning.scores import masked_forward


class MaskedModel(nn.Module):
    """A plain model evaluated with some weights substituted (e.g. ``w_pretrained * M(s*)``)."""

    def __init__(self, model: nn.Module, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.model = model
        self.weights = {k: v.detach() for k, v in weights.items()}

    def forward(self, x: Tensor) -> Tensor:
        return masked_forward(self.model, self.weights, x)


@dataclass
class RobustnessReport:
    """Figures of one evaluation; ``n_*`` say how many images each number rests on."""

    clean_acc: float
    pgd_acc: float
    aa_acc: float | None
    n_images: int
    n_aa_images: int
    eps: float
    pgd_steps: int
    pgd_restarts: int
    aa_warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _batched_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(len(x), 1)


def pgd_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, config: AttackConfig, restarts: int = 1, batch_size: int = 256
) -> float:
    """Accuracy under PGD (cross-entropy, random start, restarts) in fp32 and eval mode."""
    correct = 0
    with attack_context(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            x_adv = pgd_ce(model, xb, yb, config, restarts)
            with torch.no_grad():
                correct += int((model(x_adv).argmax(1) == yb).sum())
    return correct / max(len(x), 1)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def autoattack_adversarial(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "Linf",
    version: str = "standard",
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[Tensor, list[str]]:
    """AutoAttack (pyautoattack) adversarial examples and the warnings its own checks raised.

    ``standard`` runs APGD-CE, APGD-T, FAB-T and Square. With fewer than 10 classes the targeted
    attacks use every other class as a target.
    """
    from pyautoattack import AutoAttack

    device = next(model.parameters()).device
    num_classes = int(model(x[:1].to(device)).shape[1])
    collect = _Collect()
    logger = logging.getLogger("auto-attack")
    logger.addHandler(collect)
    try:
        with attack_context(model):
            attack = AutoAttack(model, norm=norm, eps=eps, version=version, device=device, seed=seed)
            attack.apgd_targeted.n_target_classes = min(9, num_classes - 1)
            attack.fab.n_target_classes = min(9, num_classes - 1)
            x_adv, _ = attack.run_standard_evaluation(x.to(device), y.to(device), batch_size=batch_size)
    finally:
        logger.removeHandler(collect)
    return x_adv, collect.messages


def autoattack_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "Linf",
    version: str = "standard",
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[float, list[str]]:
    """Robust accuracy under AutoAttack and its warnings."""
    x_adv, warnings = autoattack_adversarial(model, x, y, eps, norm, version, batch_size, seed)
    return _batched_accuracy(model, x_adv, y.to(x_adv.device), batch_size), warnings


def gradient_masking_checks(
    clean: float,
    pgd: float,
    pgd_fewer_steps: float,
    eps0: float,
    aa: float | None,
    n: int,
    aa_warnings: list[str] = (),
    aa_clean: float | None = None,
) -> dict[str, dict]:
    """The sanity checks that catch gradient masking and broken evaluations.

    Robust accuracy must not exceed clean accuracy (for AutoAttack: the clean accuracy ``aa_clean`` of
    the images it attacked); at eps 0 it must equal it; more PGD steps must not raise it
    (``pgd_fewer_steps``: PGD-10 against the final PGD-50, with a tolerance of one image);
    AutoAttack's own warnings are failures.
    """
    tol = 1.0 / max(n, 1) + 1e-9
    checks = {
        "pgd_at_most_clean": {"passed": pgd <= clean + 1e-9, "detail": f"pgd {pgd:.4f} vs clean {clean:.4f}"},
        "eps0_equals_clean": {
            "passed": abs(eps0 - clean) <= 1e-9,
            "detail": f"eps=0 robust {eps0:.4f} vs clean {clean:.4f}",
        },
        "more_steps_not_higher": {
            "passed": pgd <= pgd_fewer_steps + tol,
            "detail": f"PGD-10 {pgd_fewer_steps:.4f} -> final PGD {pgd:.4f}",
        },
    }
    if aa is not None:
        # AutoAttack may run on a subset: compare with the clean accuracy of that same subset.
        reference = clean if aa_clean is None else aa_clean
        checks["aa_at_most_clean"] = {
            "passed": aa <= reference + 1e-9,
            "detail": f"aa {aa:.4f} vs clean {reference:.4f} on the same images",
        }
        checks["autoattack_warnings"] = {"passed": not aa_warnings, "detail": "; ".join(aa_warnings)}
    return checks


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    pgd_steps: int = 50,
    pgd_restarts: int = 1,
    norm: str = "linf",
    aa_images: int = 0,
    aa_batch_size: int = 256,
    seed: int = 0,
) -> RobustnessReport:
    """Clean and PGD accuracy on all of ``x``; AutoAttack on its first ``aa_images`` (0: skip)."""
    model.eval()
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    torch.manual_seed(seed)
    clean = _batched_accuracy(model, x, y, aa_batch_size)
    pgd_acc = pgd_accuracy(model, x, y, AttackConfig(eps, step_size, pgd_steps, norm), pgd_restarts)
    aa_acc, warnings, n_aa = None, [], 0
    if aa_images:
        n_aa = min(aa_images, len(x))
        aa_norm = {"linf": "Linf", "l2": "L2"}[norm]
        aa_acc, warnings = autoattack_accuracy(
            model, x[:n_aa], y[:n_aa], eps, aa_norm, batch_size=aa_batch_size, seed=seed
        )
    return RobustnessReport(clean, pgd_acc, aa_acc, len(x), n_aa, eps, pgd_steps, pgd_restarts, warnings)
