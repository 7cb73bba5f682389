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
from torch import Tensor

from s2ap_lightning.attacks.losses import LossOutput
from s2ap_lightning.checkpoint import report_init_from
from s2ap_lightning.checks import check_range
from s2ap_lightning.models.batchnorm import BATCHNORM_TYPES, batchnorm_layers, frozen_bn_statistics
from s2ap_lightning.pruning.methods import BaseMethodHooks, build_method, check_method_options
from s2ap_lightning.pruning.objective import SearchObjective
from s2ap_lightning.pruning.perturbation import perturbed, score_perturbation
from s2ap_lightning.pruning.scores import exact_zero_fraction
from s2ap_lightning.stages.base import RobustTask, saved_stage
from s2ap_lightning.stages.callbacks import MaskStabilityCallback


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
        base_method: a name in :data:`s2ap_lightning.pruning.methods.METHODS`: ``hydra`` (per-layer
            rate fixed by ``sparsity``) or ``harp`` (a learnt keep rate per layer, pushed to the
            overall target by a size loss). S2AP perturbs the scores only.
        size_loss_weight: HARP option, see :class:`~s2ap_lightning.pruning.methods.Harp`.
        rate_grad: HARP option, see :class:`~s2ap_lightning.pruning.methods.Harp`.
        rate_bound: HARP option, see :class:`~s2ap_lightning.pruning.methods.Harp`.
        density_tolerance: HARP option, see :class:`~s2ap_lightning.pruning.methods.Harp`.
        scope: HYDRA option, see :class:`~s2ap_lightning.pruning.methods.Hydra`.
        min_layer_keep: HYDRA option, see :class:`~s2ap_lightning.pruning.methods.Hydra`.
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
        check_method_options(hp.base_method, self.method_options())

    def method_options(self) -> dict[str, Any]:
        """The options the base method reads (it validates and documents them)."""
        keys = (
            "sparsity",
            "scope",
            "min_layer_keep",
            "size_loss_weight",
            "rate_grad",
            "rate_bound",
            "density_tolerance",
        )
        return {k: self.hparams[k] for k in keys}

    def configure_models(self) -> None:
        super().configure_models()
        self.scores = self.make_scores()
        for name, param in self.model.named_parameters():
            module = self.model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.model
            # Weights and biases are frozen; BatchNorm affine parameters train unless freeze_bn.
            param.requires_grad_(isinstance(module, BATCHNORM_TYPES) and not self.hparams.freeze_bn)

    def make_scores(self) -> BaseMethodHooks:
        """The base method: its scores and masks, its own state and hooks (``pruning.methods``)."""
        return build_method(self.hparams.base_method, self.model, self.method_options())

    def setup(self, stage: str) -> None:
        restored = self._restored
        super().setup(stage)
        if self.hparams.init_from and not restored:
            # Scaled score init from the loaded weights: the first mask is magnitude pruning.
            self.scores.reinitialise(self.model)
        self._eval_weights = None

    def on_init_from(self, checkpoint: Any) -> None:
        # The weights only, also from a reference's pruned checkpoint (its dense weights): the search
        # starts as HYDRA's does from a pretrained model, from scores scaled from those weights
        # (setup), rather than resuming another code's scores under this stage's own schedule.
        note = "scores start from the loaded weights (scaled init)"
        report_init_from(self.hparams.init_from, checkpoint, self.model, note)

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

    def preflight(self, trainer: L.Trainer, stage: str) -> None:
        super().preflight(trainer, stage)
        if stage == "fit" and not self.hparams.init_from and not self._restored:
            rank_zero_warn(
                "no --model.init_from: the mask search prunes randomly initialised weights. Pass the "
                "robust pretraining's checkpoint (e.g. --model.init_from runs/pretrain/best.ckpt)"
            )

    def check_handoff(self, checkpoint: Any, weights: Mapping[str, Tensor]) -> None:
        super().check_handoff(checkpoint, weights)
        zeros = exact_zero_fraction(self.model, weights)
        finetuned = saved_stage(checkpoint) == "MaskedFinetuner"
        if finetuned or zeros > 0.5:
            rank_zero_warn(
                f"init_from={self.hparams.init_from!r} holds an already pruned network "
                f"({100 * zeros:.1f} % exact zeros{', finetuned' if finetuned else ''}): the search starts "
                "its scores from pruned weights; the usual source is the dense pretraining"
            )

    def configure_callbacks(self) -> list[L.Callback]:
        # A tracker the user configured (with its own folder) wins over the default one.
        extra = super().configure_callbacks()
        if any(isinstance(c, MaskStabilityCallback) for c in self.trainer.callbacks):
            return extra
        return [*extra, MaskStabilityCallback()]

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
        state = checkpoint.get("state_dict") or {}
        for key in ("size_weight", "size_weight_frozen", "size_above_target", "budget_met"):
            # Checkpoints written before the base methods owned their state kept HARP's schedule
            # on the stage; it now lives with the method (and HYDRA has none).
            if key in state:
                value = state.pop(key)
                if f"scores.{key}" in self.state_dict():
                    state[f"scores.{key}"] = value
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
        return self.training_attack(self.net(weights), x, y)

    def _loss(self, masks: Mapping[str, Tensor], x: Tensor, x_adv: Tensor, y: Tensor) -> LossOutput:
        weights = self.scores.effective_weights(self.model, masks, differentiable=True)
        out = self.robust_loss(self.net(weights), x, x_adv, y)
        extra = self.scores.extra_loss()
        if extra is not None:
            out.loss = out.loss + extra
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
        """One mask-search step: the base method's, or S2AP's steps 1-5 of the method reference."""
        x, y = batch
        opt = self.optimizers()
        if self.hparams.freeze_bn:
            for m in batchnorm_layers(self.model):
                m.eval()
        masks = self.scores.masks()
        at_s = self._frozen(masks)  # once per step: the attack and the clean-accuracy forward share it
        # Adversarial examples for the masked network at the current scores s.
        x_adv = self._adversarial(at_s, x, y)
        opt.zero_grad()
        if not self.s2ap_active():
            out = self._loss(masks, x, x_adv, y)  # the base method: one gradient at s
            self.manual_backward(out.loss)
        else:
            scores = dict(self.scores.items())
            # 1. Gradient g of the robust loss at s (rank-local under DDP unless ascent_sync).
            with self._rank_local():
                first = self._loss(masks, x, x_adv, y)
                self.manual_backward(first.loss)
            grads = {n: s.grad for n, s in scores.items()}  # read into z before zero_grad: no copy
            # 2. The per-layer ascent z_l = gamma * ||s_l|| * g_l / ||g_l||.
            z = score_perturbation(scores, grads, self.hparams.gamma)
            opt.zero_grad()
            # 3. At s + z (restored exactly on leaving, even on an error): the perturbed mask, the
            #    adversarial examples (pass 1's, or regenerated) and the gradient of the loss there,
            #    with BatchNorm statistics left as pass 1 set them.
            with perturbed(scores, z):
                perturbed_masks = self.scores.masks()
                x_adv2 = x_adv
                if not self.hparams.reuse_adversarial:
                    x_adv2 = self._adversarial(self._frozen(perturbed_masks), x, y)
                with frozen_bn_statistics(self.model):
                    out = self._loss(perturbed_masks, x, x_adv2, y)
                    self.manual_backward(out.loss)
            self.log("train/loss_pass1", first.loss.detach())
        # Raises on a non-finite loss, before the step. Clean logits under this step's mask.
        self.log_training(out, y, lambda: self.net(at_s)(x))
        # 4. The descent from s with the gradient taken at s + z; 5. the method's own after-step.
        opt.step()
        self.scores.after_optimizer_step()
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

        self.log("prune/density", density, sync_dist=True)
        for name, value in self.scores.end_of_epoch(density, self.current_epoch).items():
            self.log(name, value, sync_dist=True)
        super().on_train_epoch_end()

    def on_train_end(self) -> None:
        message = self.scores.end_of_search_warning()
        if message:
            rank_zero_warn(message)

    def within_budget(self) -> bool:
        """Whether this epoch's mask may become ``best.ckpt`` (see ``BestCheckpoint``); the method says."""
        return self.scores.within_budget()

    def objective(self) -> SearchObjective:
        """What this search minimises, for the analyses and the mask tracker, without the stage.

        The plain model, the base method (scores and masks), the robust loss and its training
        adversary: an analysis of a checkpoint measures exactly the search's function, and depends
        on this value rather than on the Lightning module.
        """
        return SearchObjective(self.model, self.scores, self.robust_loss, self.train_attack)


class HydraPruner(ScoreSpaceSAMPruner):
    """The HYDRA baseline: the same mask search with the score perturbation off (``gamma = 0``)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["gamma"] = 0.0
        super().__init__(**kwargs)
