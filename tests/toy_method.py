"""A base method defined outside the package, as a user would: one module, nothing else edited.

HYDRA's per-layer top-k, except that the last prunable layer (the classifier) keeps its own fraction
``head_keep``. Used by tests/test_toy_method.py through ``--model.method toy_method.HeadKeep``.
"""

from __future__ import annotations

from torch import nn

from s2ap_lightning.checks import check_range
from s2ap_lightning.pruning.masks import kept_count
from s2ap_lightning.pruning.methods import BaseMethod, MethodState
from s2ap_lightning.pruning.scores import check_layers_keep_a_weight


class HeadKeepState(MethodState):
    def __init__(self, method: HeadKeep, model: nn.Module, sparsity: float) -> None:
        super().__init__(method, model, sparsity)
        check_layers_keep_a_weight(self.layer_sizes(), sparsity)

    def kept_counts(self) -> dict[str, int]:
        counts = {n: kept_count(s.numel(), self.sparsity) for n, s in self.items()}
        head = self.names[-1]
        counts[head] = max(1, round(self.method.head_keep * self[head].numel()))
        return counts


class HeadKeep(BaseMethod):
    name = "toy_head_keep"
    mask_defining = ("head_keep",)
    state_class = HeadKeepState

    def __init__(self, head_keep: float = 1.0) -> None:
        check_range("head_keep", head_keep, 0.0, 1.0, low_open=True)
        self.head_keep = head_keep
