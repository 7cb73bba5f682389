"""The evaluation every command uses: clean, PGD, AutoAttack and the gradient-masking checks.

:func:`evaluate` takes a model, images, a :class:`~s2ap_lightning.attacks.ThreatModel` (what to attack
with) and an :class:`EvalProtocol` (how), and returns an :class:`EvalRecord`;
:class:`~s2ap_lightning.evaluation.callback.EvaluationCallback` runs it in ``trainer.test``.
"""

from s2ap_lightning.attacks.pgd import ThreatModel
from s2ap_lightning.evaluation.autoattack import (
    AA_VERSIONS,
    AutoAttackPlan,
    autoattack_adversarial,
    autoattack_plan,
)
from s2ap_lightning.evaluation.callback import EvaluatedModule, EvaluationCallback
from s2ap_lightning.evaluation.checks import (
    FLAGS,
    VERDICTS,
    binomial_p_value,
    count_check,
    gradient_masking_checks,
    judge,
    not_more_accurate,
)
from s2ap_lightning.evaluation.protocol import (
    EvalProtocol,
    EvalRecord,
    MaskedModel,
    aa_membership,
    evaluate,
    evaluate_batch,
    pgd_accuracy,
    protocol_name,
    summarise,
    write_record,
)

__all__ = [
    "AA_VERSIONS",
    "FLAGS",
    "VERDICTS",
    "AutoAttackPlan",
    "EvalProtocol",
    "EvalRecord",
    "EvaluatedModule",
    "EvaluationCallback",
    "MaskedModel",
    "ThreatModel",
    "aa_membership",
    "autoattack_adversarial",
    "autoattack_plan",
    "binomial_p_value",
    "count_check",
    "evaluate",
    "evaluate_batch",
    "gradient_masking_checks",
    "judge",
    "not_more_accurate",
    "pgd_accuracy",
    "protocol_name",
    "summarise",
    "write_record",
]
