"""Stage 1: adversarial training of the dense model (PGD-AT, TRADES or MART)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from s2ap_lightning.checkpoint import report_init_from
from s2ap_lightning.stages.base import RobustTask


class RobustPretrainer(RobustTask):
    """Dense adversarial training; every argument is :class:`RobustTask`'s."""

    def on_init_from(self, checkpoint: Any) -> None:
        # The weights only (a reference's pruned checkpoint: its dense weights); the line says what
        # else the file held, so nothing it carried is dropped unnoticed.
        report_init_from(self.hparams.init_from, checkpoint, self.model)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        net = self.net()
        x_adv = self.training_attack(net, x, y)
        out = self.robust_loss(net, x, x_adv, y)
        self.log_training(out, y, lambda: net(x))
        return out.loss
