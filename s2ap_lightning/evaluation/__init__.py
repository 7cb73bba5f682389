"""The evaluation protocol every command uses: clean, PGD, AutoAttack and the masking checks."""

from s2ap_lightning.evaluation.autoattack import AutoAttackPlan, autoattack_adversarial, autoattack_plan
from s2ap_lightning.evaluation.protocol import (
    EvalProtocol,
    EvalRecord,
    MaskedModel,
    aa_membership,
    evaluate,
    evaluate_batch,
    gradient_masking_checks,
    pgd_accuracy,
    summarise,
    write_record,
)

__all__ = [
    "AutoAttackPlan",
    "EvalProtocol",
    "EvalRecord",
    "MaskedModel",
    "aa_membership",
    "autoattack_adversarial",
    "autoattack_plan",
    "evaluate",
    "evaluate_batch",
    "pgd_accuracy",
    "gradient_masking_checks",
    "summarise",
    "write_record",
]
