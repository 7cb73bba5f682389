"""Stage 2: mask search over importance scores, with S2AP's score-space sharpness minimisation.

One optimiser step (method reference, section 4):

1. adversarial examples on the current masked model ``w * M(s)`` (mask computed once, here);
2. during warm-up, or with ``gamma = 0``: a plain base-method (HYDRA) step, and stop;
3. pass 1: robust loss at ``s``, backward, per-layer score gradients ``g_l``;
4. ``s <- s + z`` with ``z_l = gamma * ||s_l|| * g_l / (||g_l|| + 1e-12)`` (second mask computation);
5. pass 2: zero the gradients, robust loss at ``s + z`` on the same ``x_adv`` (or regenerated ones),
   BatchNorm running statistics frozen, backward;
6. restore ``s`` and take one optimiser step with the pass-2 gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from s2ap_lightning.attacks.losses import LossOutput
from s2ap_lightning.pruning.perturbation import add_, frozen_bn_statistics, score_perturbation
from s2ap_lightning.pruning.scores import BASE_METHODS, RATE_GRADS, HarpScoreSet, ScoreSet, masked_forward
from s2ap_lightning.stages.base import RobustTask, check_range

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class ScoreSpaceSAMPruner(RobustTask):
    """HYDRA mask search with S2AP; ``gamma = 0`` is plain HYDRA.

    Args:
        sparsity: pruned fraction per layer, in (0, 1): 0.9 keeps 10 % of every layer's weights.
        gamma: relative score-space radius; 0 disables S2AP (the HYDRA baseline).
        warmup_epochs: epochs of plain base-method steps before S2AP starts (paper: 5 of 20).
        reuse_adversarial: pass 2 reuses pass 1's adversarial examples (default); False regenerates
            them on the perturbed mask (about twice the cost).
        freeze_bn: keep BatchNorm in eval mode with frozen affine parameters during the search
            (HYDRA's default is False: affine parameters train, running statistics update).
        ascent_sync: under data parallelism, synchronise the pass-1 gradient (a global ascent
            direction); default False keeps it per device, as SAM does. Pass 2 is always synced.
        base_method: ``hydra`` (per-layer rate fixed by ``sparsity``) or ``harp`` (a learnt keep rate
            per layer, pushed to the overall target by a size loss). S2AP perturbs the scores only.
        size_loss_weight: HARP's size-loss weight per epoch: ``size_loss_weight * (epoch + 1)`` in
            epoch ``epoch`` (from 0), HARP's step-wise incremental weight, until the density target is
            met; from then on it stays. HARP's own runs use 0.01 (CIFAR-10) and 0.1 (ImageNet) with
            their models; 1.0 is the default of HARP's code.
        rate_grad: which scalar HARP's summed mask gradient is the gradient of: ``logit`` (the
            learnable ``r``, the method reference's wording) or ``keep`` (the keep fraction, chained
            through the sigmoid, as HARP's code); see :class:`~s2ap_lightning.pruning.scores.HarpScoreSet`.
        rate_bound: HARP's rates are clamped to ``[-rate_bound, rate_bound]`` after every step so a
            layer's sigmoid cannot saturate out of the size loss's reach (``None``: no clamp; see
            :class:`~s2ap_lightning.pruning.scores.HarpScoreSet`).
        density_tolerance: HARP's best checkpoint is chosen among the epochs whose density lies in
            ``[target - density_tolerance, target]``: never over the budget (as HARP selects), and not
            so far under it that the row compares a different sparsity.
        scope: ``layer`` (the paper's per-layer top-k) or ``global`` (one threshold across layers).
        min_layer_keep: with ``scope: global``, the fraction of every layer always kept.

        lr: score learning rate (HYDRA: 0.1).
        **kwargs: see :class:`~s2ap_lightning.stages.base.RobustTask`.

    """

    def __init__(
        self,
        sparsity: float = 0.9,
        gamma: float = 0.01,
        warmup_epochs: int = 5,
        reuse_adversarial: bool = True,
        freeze_bn: bool = False,
        ascent_sync: bool = False,
        base_method: str = "hydra",
        size_loss_weight: float = 1.0,
        rate_grad: str = "logit",
        rate_bound: float | None = 6.0,
        density_tolerance: float = 0.005,
        scope: str = "layer",
        min_layer_keep: float = 0.0,
        lr: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, **kwargs)
        self.automatic_optimization = False
        # HARP's size-loss weight grows per epoch until the density target is met, then stays; the
        # buffers go into checkpoints so a resumed search continues the same schedule.
        self.register_buffer("size_weight", torch.tensor(float(size_loss_weight)))
        self.register_buffer("size_weight_frozen", torch.tensor(False))
        self.register_buffer("size_above_target", torch.tensor(False))
        self.register_buffer("budget_met", torch.tensor(False))

        self._eval_weights: dict[str, Tensor] | None = None

    # ----------------------------------------------------------------- configuration
    def validate_hparams(self) -> None:
        super().validate_hparams()
        hp = self.hparams
        check_range("sparsity", hp.sparsity, 0.0, 1.0, low_open=True, high_open=True)
        check_range("gamma", hp.gamma, 0.0, None)
        if hp.gamma > 0.5:
            rank_zero_warn(
                f"gamma={hp.gamma:g} is very large: the score perturbation is more than half of each "
                "layer's score norm (the paper sweeps 0.001 to 0.1)"
            )
        check_range("warmup_epochs", hp.warmup_epochs, 0, None)
        check_range("size_loss_weight", hp.size_loss_weight, 0.0, None)
        if hp.rate_bound is not None:
            check_range("rate_bound", hp.rate_bound, 0.0, None, low_open=True)
        check_range("density_tolerance", hp.density_tolerance, 0.0, 1.0)
        if hp.rate_grad not in RATE_GRADS:
            raise ValueError(f"rate_grad={hp.rate_grad!r} is unknown; valid: {', '.join(RATE_GRADS)}")

        if hp.base_method not in BASE_METHODS:
            raise ValueError(f"base_method={hp.base_method!r} is unknown; valid: {', '.join(BASE_METHODS)}")
        if hp.scope not in ("layer", "global"):
            raise ValueError(f"scope={hp.scope!r} is unknown; valid: layer, global")
        if hp.base_method == "harp" and hp.scope != "layer":
            raise ValueError("scope='global' does not apply to base_method='harp' (its rates set each layer)")

    def configure_models(self) -> None:
        super().configure_models()
        self.scores = self.make_scores()
        for name, param in self.model.named_parameters():
            module = self.model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.model
            # Weights and biases are frozen; BatchNorm affine parameters train unless freeze_bn.
            param.requires_grad_(isinstance(module, _BN) and not self.hparams.freeze_bn)

    def make_scores(self) -> ScoreSet:
        """The score container of the base method (HARP adds learnt per-layer rates)."""
        hp = self.hparams
        if hp.base_method == "harp":
            return HarpScoreSet(self.model, hp.sparsity, rate_grad=hp.rate_grad, rate_bound=hp.rate_bound)
        return ScoreSet(self.model, hp.sparsity, scope=hp.scope, min_layer_keep=hp.min_layer_keep)

    def setup(self, stage: str) -> None:
        restored = self._restored
        super().setup(stage)
        if self.hparams.init_from and not restored:
            # Scaled score init from the loaded weights: the first mask is magnitude pruning.
            self.scores.reinitialise(self.model)
        self._eval_weights = None

    def check_trainer(self, trainer: L.Trainer) -> None:
        super().check_trainer(trainer)
        epochs = trainer.max_epochs
        if (
            self.hparams.gamma > 0
            and epochs is not None
            and epochs > 0
            and self.hparams.warmup_epochs >= epochs
        ):
            raise ValueError(
                f"warmup_epochs={self.hparams.warmup_epochs} is out of range: it must be smaller "
                f"than the search length (trainer.max_epochs={epochs}), or S2AP never acts"
            )

    def configure_callbacks(self) -> list[L.Callback]:
        from s2ap_lightning.analysis.stability import MaskStabilityCallback

        # A tracker the user configured (with its own folder) wins over the default one.
        if any(isinstance(c, MaskStabilityCallback) for c in self.trainer.callbacks):
            return []
        return [MaskStabilityCallback()]

    #: Hyper-parameters that define the mask: a checkpoint restored under other values would be
    #: evaluated or resumed with a different mask than the one it was searched with.
    MASK_DEFINING = ("sparsity", "base_method", "scope", "min_layer_keep")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters") or {}
        for key in self.MASK_DEFINING:
            if key in saved and saved[key] != self.hparams[key]:
                raise ValueError(
                    f"{key}={self.hparams[key]!r} does not match the checkpoint's {key}={saved[key]!r}: "
                    f"the mask would differ from the searched one. Pass --model.{key} {saved[key]}"
                )
        super().on_load_checkpoint(checkpoint)

        self._eval_weights = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        with torch.no_grad():
            checkpoint["masks"] = {n: m.bool() for n, m in self.scores.masks().items()}

    # ----------------------------------------------------------------- masked network
    def weights_for_eval(self) -> Mapping[str, Tensor]:
        if self._eval_weights is None:
            with torch.inference_mode(False), torch.no_grad():
                self._eval_weights = self._frozen(self.scores.masks())

        return self._eval_weights

    def _frozen(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``w * M`` without a graph to the scores: what attacks and accuracy forwards use."""
        return self.scores.effective_weights(self.model, masks, differentiable=False)

    def _adversarial(self, weights: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return self.robust_loss.adversarial(
            lambda inp: masked_forward(self.model, weights, inp), x, y, self.train_attack, self.model
        )

    def _loss(self, masks: Mapping[str, Tensor], x: Tensor, x_adv: Tensor, y: Tensor) -> LossOutput:
        weights = self.scores.effective_weights(self.model, masks, differentiable=True)
        out = self.robust_loss(lambda inp: masked_forward(self.model, weights, inp), x, x_adv, y)
        if isinstance(self.scores, HarpScoreSet):
            out.loss = out.loss + self.size_weight * self.scores.size_loss()
        return out

    def _rank_local(self) -> contextlib.AbstractContextManager:
        """No gradient synchronisation for the enclosed backward under DDP (pass 1, by default)."""
        strategy = self.trainer.strategy
        if self.hparams.ascent_sync or not hasattr(strategy, "block_backward_sync"):
            return contextlib.nullcontext()
        return strategy.block_backward_sync()

    def s2ap_active(self) -> bool:
        return self.hparams.gamma > 0 and self.current_epoch >= self.hparams.warmup_epochs

    # ----------------------------------------------------------------- the step
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        opt = self.optimizers()
        if self.hparams.freeze_bn:
            for m in self.model.modules():
                if isinstance(m, _BN):
                    m.eval()
        masks = self.scores.masks()
        at_s = self._frozen(masks)  # once per step: the attack and the clean-accuracy forward share it
        x_adv = self._adversarial(at_s, x, y)
        opt.zero_grad()
        if not self.s2ap_active():
            out = self._loss(masks, x, x_adv, y)
            self.manual_backward(out.loss)
        else:
            with self._rank_local():
                first = self._loss(masks, x, x_adv, y)
                self.manual_backward(first.loss)
            scores = dict(self.scores.items())
            grads = {n: s.grad.detach().clone() for n, s in scores.items()}
            z = score_perturbation(scores, grads, self.hparams.gamma)
            original = {n: s.detach().clone() for n, s in scores.items()}
            add_(scores, z)
            opt.zero_grad()
            perturbed = self.scores.masks()
            x_adv2 = (
                x_adv if self.hparams.reuse_adversarial else self._adversarial(self._frozen(perturbed), x, y)
            )
            with frozen_bn_statistics(self.model):
                out = self._loss(perturbed, x, x_adv2, y)
                self.manual_backward(out.loss)
            with torch.no_grad():  # exact restore of s (subtracting z could differ in the last bit)
                torch._foreach_copy_(list(scores.values()), [original[n] for n in scores])
            self.log("train/loss_pass1", first.loss.detach())
        # Raises on a non-finite loss, before the step. Clean logits under this step's mask.
        self.log_training(out, y, lambda: masked_forward(self.model, at_s, x))

        opt.step()
        if isinstance(self.scores, HarpScoreSet):
            self.scores.clamp_rates_()
        self._eval_weights = None

        return out.loss.detach()

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        for name, score in self.scores.items():
            if not torch.isfinite(score).all():
                raise FloatingPointError(
                    f"{type(self).__name__}: non-finite scores in {name} at epoch "
                    f"{self.current_epoch}, step {self.global_step}; the last good checkpoint is kept"
                )
        with torch.no_grad():
            masks = self.scores.masks()
            # Cached for evaluation and the per-layer sparsity log: one mask computation per epoch.
            self._eval_weights = self._frozen(masks)
        density = self.scores.density(masks)

        self.log("prune/density", density)
        if isinstance(self.scores, HarpScoreSet):
            self.update_size_weight(density, self.current_epoch)
            self.log("prune/size_weight", self.size_weight)
            if self._in_band(density):
                self.budget_met.fill_(True)
        super().on_train_epoch_end()

    def on_train_end(self) -> None:
        if isinstance(self.scores, HarpScoreSet) and not bool(self.budget_met):
            target, tol = self.scores.target, self.hparams.density_tolerance
            rank_zero_warn(
                f"HARP's density never ended an epoch in [{target - tol:g}, {target:g}] (now "
                f"{self.scores.density(self.scores.masks()):.4f}): the best checkpoint only takes epochs "
                "within that band, so there is none. Raise size_loss_weight or search for more epochs."
            )

    def update_size_weight(self, density: float, epoch: int) -> None:
        """HARP's schedule after epoch ``epoch``: grow the weight linearly until the target is met.

        The rates start at the target, so "met" means back at or under it after having exceeded it
        (the robust loss first pulls the rates up); HARP's runs start above the target, where the two
        readings agree.
        """
        if bool(self.size_weight_frozen):
            return
        if self._over_budget(density):
            self.size_above_target.fill_(True)
        elif bool(self.size_above_target):
            self.size_weight_frozen.fill_(True)
            return
        self.size_weight.fill_(self.hparams.size_loss_weight * (epoch + 2))

    def within_budget(self) -> bool:
        """Whether the current mask's density is in ``[target - density_tolerance, target]``.

        Always true for HYDRA, whose per-layer counts are exact. HARP's model selection only
        considers epochs within the budget, so ``best.ckpt`` never holds a larger mask than asked for
        (see :class:`~s2ap_lightning.stages.callbacks.BestCheckpoint`).
        """
        if not isinstance(self.scores, HarpScoreSet):
            return True
        with torch.no_grad():
            density = self.scores.density(self.scores.masks())
        return self._in_band(density)

    def _over_budget(self, density: float) -> bool:
        # Per-layer counts are rounded (as HYDRA's are), which can add up to half a weight per layer.
        scores = self.scores
        rounding = 0.5 * len(scores.names) / sum(s.numel() for _, s in scores.items())
        return density > scores.target + rounding + 1e-12

    def _in_band(self, density: float) -> bool:
        return (
            not self._over_budget(density)
            and density >= self.scores.target - self.hparams.density_tolerance - 1e-9
        )


class HydraPruner(ScoreSpaceSAMPruner):
    """The HYDRA baseline: the same mask search with the score perturbation off (``gamma = 0``)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["gamma"] = 0.0
        super().__init__(**kwargs)
