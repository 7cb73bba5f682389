"""The Lightning stages: robust pretraining, mask search, masked finetuning."""

from typing import Any

from s2ap_lightning.stages.base import RobustTask
from s2ap_lightning.stages.finetune import MaskedFinetuner
from s2ap_lightning.stages.pretrain import RobustPretrainer
from s2ap_lightning.stages.prune import ScoreSpaceSAMPruner

__all__ = ["MaskedFinetuner", "RobustPretrainer", "RobustTask", "ScoreSpaceSAMPruner"]


def __getattr__(name: str) -> Any:
    # Removed names users' code or configs may still use, each with what replaced it.
    if name == "HydraPruner":
        raise AttributeError(
            "s2ap_lightning.stages.HydraPruner was removed: the HYDRA baseline is ScoreSpaceSAMPruner "
            "with gamma=0 (--model ScoreSpaceSAMPruner --model.gamma 0)"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
