"""Input-space attacks and the robust losses built on them."""

from s2ap_lightning.attacks.losses import (
    ROBUST_LOSSES,
    LossOutput,
    MARTLoss,
    PGDATLoss,
    RobustLoss,
    TRADESLoss,
    build_robust_loss,
)
from s2ap_lightning.attacks.pgd import (
    NORMS,
    AttackConfig,
    ThreatModel,
    attack_context,
    eval_mode,
    pgd,
    pgd_ce,
)

__all__ = [
    "NORMS",
    "ROBUST_LOSSES",
    "AttackConfig",
    "LossOutput",
    "MARTLoss",
    "PGDATLoss",
    "RobustLoss",
    "TRADESLoss",
    "ThreatModel",
    "attack_context",
    "build_robust_loss",
    "eval_mode",
    "pgd",
    "pgd_ce",
]
