"""The Lightning stages: robust pretraining, mask search, masked finetuning."""

from s2ap_lightning.stages.base import RobustTask
from s2ap_lightning.stages.finetune import MaskedFinetuner
from s2ap_lightning.stages.pretrain import RobustPretrainer
from s2ap_lightning.stages.prune import HydraPruner, ScoreSpaceSAMPruner

__all__ = [
    "HydraPruner",
    "MaskedFinetuner",
    "RobustPretrainer",
    "RobustTask",
    "ScoreSpaceSAMPruner",
]
