"""Stage 3: adversarial finetuning of the kept weights with the mask fixed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from s2ap_lightning.checkpoint import (
    read_init_source,
    reference_masks,
    report_init_from,
    stored_masks,
)
from s2ap_lightning.checks import check_range
from s2ap_lightning.models.batchnorm import frozen_bn_statistics
from s2ap_lightning.pruning.fixed_masks import MaskSet
from s2ap_lightning.pruning.perturbation import layerwise_perturbation
from s2ap_lightning.pruning.scores import exact_zero_fraction
from s2ap_lightning.stages.base import saved_stage
from s2ap_lightning.stages.pretrain import RobustPretrainer


class MaskedFinetuner(RobustPretrainer):
    """Finetunes ``w * M`` with ``M`` taken from ``init_from``.

    ``init_from`` is a mask-search checkpoint (its stored masks are used), a pruned plain state dict
    (the mask is where the weights are non-zero; also HYDRA's and HARP's ``*_dense.pth.tar``), or a
    HYDRA or HARP pruned checkpoint, whose weights are dense and whose mask is computed from its
    ``popup_scores`` (and HARP's ``k_score``) as those codes do, with the run's ``--k`` given as
    ``reference_k`` (the file does not hold it). Pruned weights are exactly zero after every
    optimiser step: their gradients are masked before the step (so momentum and weight decay never
    move them) and the mask is re-applied after it.

    With ``awp_gamma > 0`` the finetuning is AWP (Wu et al.), as the S2AP paper finetunes: before the
    loss on ``x_adv``, every weight tensor with more than one dimension is moved by
    ``v_l = awp_gamma * ||w_l|| * d_l / ||d_l||`` (one ascent step on the same ``x_adv``, masked so that
    pruned weights stay zero), the gradient is taken there, the weights are restored, and the
    optimiser steps. Use the same finetuning for the baseline and the S2AP masks.

    Args:
        lr: finetuning learning rate (paper: 0.01).
        awp_gamma: relative AWP radius; 0 disables AWP (paper: 0.01 with PGD-AT, 0.005 with TRADES).
        awp_warmup_epochs: epochs of plain adversarial finetuning before AWP starts.
        reference_k: for a HYDRA or HARP pruned ``init_from``: that run's ``--k`` (the fraction of
            weights kept, 1 - sparsity), which its mask depends on.
        reference_alpha: for a HARP pruned ``init_from``: that run's ``--alpha`` (HARP's default 0.1),
            the lower bound of its per-layer keep rates as a fraction of ``k``.
        **kwargs: see :class:`~s2ap_lightning.stages.base.RobustTask`.

    """

    def __init__(
        self,
        lr: float = 0.01,
        awp_gamma: float = 0.0,
        awp_warmup_epochs: int = 0,
        reference_k: float | None = None,
        reference_alpha: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, **kwargs)
        self._awp_offsets: dict[str, Tensor] | None = None

    def validate_hparams(self) -> None:
        super().validate_hparams()
        check_range("awp_gamma", self.hparams.awp_gamma, 0.0, None)
        check_range("awp_warmup_epochs", self.hparams.awp_warmup_epochs, 0, None)
        if self.hparams.reference_k is not None:
            check_range("reference_k", self.hparams.reference_k, 0.0, 1.0, low_open=True)
        check_range("reference_alpha", self.hparams.reference_alpha, 0.0, 1.0)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        hp = self.hparams
        if hp.awp_gamma == 0 or self.current_epoch < hp.awp_warmup_epochs:
            return super().training_step(batch, batch_idx)
        x, y = batch
        net = self.net()
        x_adv = self.training_attack(net, x, y)
        weights = {n: p for n, p in self.model.named_parameters() if p.dim() > 1}
        with frozen_bn_statistics(self.model):  # the ascent pass must not move BatchNorm statistics
            ascent = self.robust_loss(net, x, x_adv, y).loss
        grads = dict(zip(weights, torch.autograd.grad(ascent, list(weights.values())), strict=True))
        masks = dict(self.masks.items())
        # The same layer-wise relative step as S2AP's, on the weights; pruned weights stay zero.
        offsets = layerwise_perturbation(weights, grads, hp.awp_gamma)
        with torch.no_grad():
            for name, v in offsets.items():
                if name in masks:
                    v.mul_(masks[name])
                weights[name].add_(v)
        # Removed in on_before_optimizer_step: the gradient is taken at w + v, the step made from w.
        self._awp_offsets = offsets
        out = self.robust_loss(net, x, x_adv, y)
        self.log_training(out, y, lambda: net(x))
        return out.loss

    def configure_models(self) -> None:
        super().configure_models()
        self.masks = MaskSet(self.model)

    def check_handoff(self, checkpoint: Any, weights: Mapping[str, Tensor]) -> None:
        """Finetuning needs a mask: stored, a reference's scores, or a pruned network's zeros.

        A reference's pruned checkpoint without ``reference_k`` fails here too, before any write.
        """
        super().check_handoff(checkpoint, weights)
        masks, _ = self.init_masks(checkpoint)
        zeros = exact_zero_fraction(self.model, weights)
        if masks is None and zeros < 0.01:
            stage = saved_stage(checkpoint)
            what = f"a {stage} checkpoint" if stage else "a checkpoint"
            raise ValueError(
                f"init_from={self.hparams.init_from!r} is {what} without a mask ({100 * zeros:.2f} % of "
                "its prunable weights are zero): finetuning it would give a dense model. Pass the mask "
                "search's checkpoint (s2ap fit --config configs/stages/s2ap.yaml ... best.ckpt) or a "
                "pruned state dict (s2ap export)"
            )

    def init_masks(self, checkpoint: Any) -> tuple[dict[str, Tensor] | None, str]:
        """The masks ``init_from`` defines (None: its non-zero weights) and how they were found."""
        masks = stored_masks(checkpoint)
        if masks is not None:
            return masks, "mask: the stored masks"
        source = read_init_source(checkpoint, self.model)
        if not source.scores:
            return None, "mask: the non-zero weights"
        k, alpha = self.hparams.reference_k, self.hparams.reference_alpha
        if k is None:
            raise ValueError(
                f"init_from={self.hparams.init_from!r} is a HYDRA/HARP pruned checkpoint: dense weights "
                "and popup_scores, whose mask depends on the run's --k, which the file does not hold. "
                "Pass --model.reference_k K (HYDRA's/HARP's --k: the fraction kept, e.g. 0.01 at "
                "sparsity 0.99) or a file with the pruned weights zeroed (their *_dense.pth.tar)"
            )
        rule = f"HARP's k_score rates, k={k:g}, alpha={alpha:g}" if source.rates else f"k={k:g}"
        return reference_masks(source, k, alpha), f"mask: top |popup_scores| per layer ({rule})"

    def on_init_from(self, checkpoint: Any) -> None:
        masks, note = self.init_masks(checkpoint)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, buf in self.masks.items():
                if masks is not None:
                    buf.copy_(masks[name])
                else:
                    buf.copy_((params[name] != 0).to(buf.dtype))
        self.apply_masks()
        report_init_from(self.hparams.init_from, checkpoint, self.model, note)

    @torch.no_grad()
    def apply_masks(self) -> None:
        params = dict(self.model.named_parameters())
        for name, mask in self.masks.items():
            params[name].mul_(mask)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        params = dict(self.model.named_parameters())
        if self._awp_offsets is not None:  # AWP: gradients were taken at w + v; step from w
            with torch.no_grad():
                for name, v in self._awp_offsets.items():
                    params[name].sub_(v)
            self._awp_offsets = None
        for name, mask in self.masks.items():
            if params[name].grad is not None:
                params[name].grad.mul_(mask)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.apply_masks()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["masks"] = {n: m.bool() for n, m in self.masks.items()}
