"""Stage 1: adversarial training of the dense model (PGD-AT, TRADES or MART)."""

from __future__ import annotations

from torch import Tensor

from s2ap_lightning.stages.base import RobustTask


class RobustPretrainer(RobustTask):
    """Dense adversarial training; every argument is :class:`RobustTask`'s."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        x_adv = self.robust_loss.adversarial(self.model, x, y, self.train_attack, self.model)
        out = self.robust_loss(self.model, x, x_adv, y)
        self.log_training(out, y, lambda: self.model(x))
        return out.loss
