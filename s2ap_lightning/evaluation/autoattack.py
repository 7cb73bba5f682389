"""AutoAttack (``pyautoattack``) for any number of classes, decided before any attack runs.

AutoAttack's targeted attacks assume many classes: APGD-T's targeted DLR loss reads the fourth
largest logit (so needs >= 4 classes) and the untargeted DLR loss the third (>= 3); FAB-T and APGD-T
use at most ``num_classes - 1`` target classes. :func:`autoattack_plan` keeps the attacks of the
version that are defined for the class count and records the rest with the reason, so a 2-class
evaluation does not crash half-way after PGD has already run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import Tensor, nn

from s2ap_lightning.attacks.pgd import attack_context

AA_VERSIONS = ("standard", "plus", "rand")
_VERSION_ATTACKS = {
    "standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
    "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
    "rand": ["apgd-ce", "apgd-dlr"],
}
#: Fewest classes each attack is defined for, and why.
_MIN_CLASSES = {
    "apgd-dlr": (3, "the DLR loss reads the third largest logit"),
    "apgd-t": (4, "the targeted DLR loss reads the fourth largest logit"),
}


@dataclass(frozen=True)
class AutoAttackPlan:
    """Which AutoAttack attacks run for a class count, with how many targets, and what is skipped."""

    version: str
    num_classes: int
    attacks: list[str]
    n_target_classes: int
    skipped: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        text = f"AutoAttack {self.version}: {', '.join(self.attacks)}"
        if any(a.endswith("-t") for a in self.attacks):
            text += f" ({self.n_target_classes} target classes)"
        for name, why in self.skipped.items():
            text += f"; skipped {name} ({why})"
        return text


def autoattack_plan(num_classes: int, version: str = "standard") -> AutoAttackPlan:
    """The attacks of ``version`` defined for ``num_classes`` (>= 2) classes."""
    if version not in AA_VERSIONS:
        raise ValueError(f"aa_version={version!r} is unknown; valid: {', '.join(AA_VERSIONS)}")
    if num_classes < 2:
        raise ValueError(f"AutoAttack needs at least 2 classes, got num_classes={num_classes}")
    attacks, skipped = [], {}
    for name in _VERSION_ATTACKS[version]:
        need, why = _MIN_CLASSES.get(name, (2, ""))
        if num_classes < need:
            skipped[name] = f"needs >= {need} classes: {why}; this model has {num_classes}"
        else:
            attacks.append(name)
    return AutoAttackPlan(version, num_classes, attacks, min(9, num_classes - 1), skipped)


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
    plan: AutoAttackPlan,
    norm: str = "linf",
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[Tensor, list[str]]:
    """AutoAttack adversarial examples under ``plan`` and the warnings AutoAttack's own checks raised."""
    from pyautoattack import AutoAttack  # AutoAttack loads slowly; only evaluations that run it need it

    device = x.device
    collect = _Collect()
    logger = logging.getLogger("auto-attack")
    logger.addHandler(collect)
    try:
        with attack_context(model):
            aa_norm = {"linf": "Linf", "l2": "L2"}[norm]
            attack = AutoAttack(model, norm=aa_norm, eps=eps, version=plan.version, device=device, seed=seed)
            attack.attacks_to_run = list(plan.attacks)
            attack.apgd_targeted.n_target_classes = plan.n_target_classes
            attack.fab.n_target_classes = plan.n_target_classes
            x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        logger.removeHandler(collect)
    return x_adv, collect.messages
