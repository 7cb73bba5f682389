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
from s2ap_lightning.pruning.methods import BaseMethod, method_from_config, method_from_legacy
from s2ap_lightning.pruning.objective import SearchObjective
from s2ap_lightning.pruning.perturbation import perturbed, score_perturbation
from s2ap_lightning.pruning.scores import exact_zero_fraction
from s2ap_lightning.stages.base import RobustTask, saved_stage
from s2ap_lightning.stages.callbacks import MaskStabilityCallback
from s2ap_lightning.stages.hparams import LEGACY_METHOD_KEYS, upgrade_checkpoint_hparams


class ScoreSpaceSAMPruner(RobustTask):
    """Mask search of a score-based base method with S2AP; ``gamma = 0`` is the base method itself.

    Args:
        sparsity: pruned fraction, in (0, 1): 0.9 keeps 10 % of the weights (per layer for HYDRA's
            default scope; overall for HARP's learnt rates).
        gamma: S2AP's relative score-space radius; 0 disables S2AP (the base method's baseline).
        warmup_epochs: epochs of plain base-method steps before S2AP starts (paper: 5 of 20).
        reuse_adversarial: pass 2 reuses pass 1's adversarial examples (default); False regenerates
            them on the perturbed mask (about twice the cost).
        freeze_bn: keep BatchNorm in eval mode with frozen affine parameters during the search
            (HYDRA's default is False: affine parameters train, running statistics update).
        ascent_sync: under data parallelism, synchronise the pass-1 gradient (a global ascent
            direction); default False keeps it per device, as SAM does. Pass 2 is always synced.
        method: the score-based base method S2AP plugs into, with its own options
            (``--model.method harp --model.method.rate_bound 6``); None: HYDRA with its defaults.
            A new method is a new module under :mod:`s2ap_lightning.pruning.methods`.
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
        method: BaseMethod | None = None,
        lr: float = 0.1,
        **kwargs: Any,
    ) -> None:
        # Checkpoints written before the methods owned their options name them flat (base_method, ...).
        legacy = {key: kwargs.pop(key) for key in LEGACY_METHOD_KEYS if key in kwargs}
        self.method_spec = method_from_legacy(legacy) if legacy else method_from_config(method or "hydra")
        super().__init__(lr=lr, **kwargs)
        self.automatic_optimization = False
        self._eval_weights: dict[str, Tensor] | None = None
        self._eval_masks: dict[str, Tensor] = {}

    def primitive_blocks(self) -> dict[str, Any]:
        return {**super().primitive_blocks(), "method": self.method_spec.config()}

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
        self.method_spec.check_sparsity(hp.sparsity)

    def configure_models(self) -> None:
        super().configure_models()
        # The base method's scores, masks and own state (HARP's rates): what the search trains.
        self.method = self.method_spec.build(self.model, self.hparams.sparsity)
        for name, param in self.model.named_parameters():
            module = self.model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.model
            # Weights and biases are frozen; BatchNorm affine parameters train unless freeze_bn.
            param.requires_grad_(isinstance(module, BATCHNORM_TYPES) and not self.hparams.freeze_bn)

    def setup(self, stage: str) -> None:
        fresh = self.loads_init_from()
        super().setup(stage)
        if fresh:
            # Scaled score init from the loaded weights: the first mask is magnitude pruning.
            self.method.reinitialise(self.model)
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

    def preflight(self, trainer: L.Trainer, stage: str, from_checkpoint: bool = False) -> None:
        super().preflight(trainer, stage, from_checkpoint)
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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = upgrade_checkpoint_hparams(checkpoint.get("hyper_parameters") or {})
        self.refuse_other_mask(saved)
        state = checkpoint.get("state_dict") or {}
        own = self.state_dict()
        for key in list(state):
            # Before the method object was `method`, its state lived under `scores.` (and, earlier,
            # HARP's schedule on the stage itself, where HYDRA checkpoints carried it too: dropped,
            # HYDRA has none).
            if key.startswith("scores."):
                state["method." + key.removeprefix("scores.")] = state.pop(key)
            elif key in ("size_weight", "size_weight_frozen", "size_above_target", "budget_met"):
                value = state.pop(key)
                if f"method.{key}" in own:
                    state[f"method.{key}"] = value
        super().on_load_checkpoint(checkpoint)
        self._eval_weights = None

    def refuse_other_mask(self, saved: dict[str, Any]) -> None:
        """Refuse restoring a checkpoint under settings that define another mask than the searched one.

        The sparsity, the base method and the options its class names as mask-defining; evaluated or
        resumed under other values, the checkpoint's scores would give another mask.
        """
        if "sparsity" in saved and saved["sparsity"] != self.hparams.sparsity:
            raise ValueError(
                f"sparsity={self.hparams.sparsity!r} does not match the checkpoint's sparsity="
                f"{saved['sparsity']!r}: the mask would differ from the searched one. Pass "
                f"--model.sparsity {saved['sparsity']}"
            )
        if "method" not in saved:
            return
        differences = self.method_spec.mask_differences(method_from_config(saved["method"]))
        for key, (mine, theirs) in differences.items():
            option = "--model.method" if key == "method" else f"--model.method.{key}"
            raise ValueError(
                f"{option.removeprefix('--model.')}={mine!r} does not match the checkpoint's {theirs!r}: "
                f"the mask would differ from the searched one. Pass {option} {theirs}"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        with torch.no_grad():
            checkpoint["masks"] = {n: m.bool() for n, m in self.method.masks().items()}

    # ----------------------------------------------------------------- masked network
    def evaluated_weights(self) -> Mapping[str, Tensor]:
        return self._evaluated()[0]

    def _evaluated(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(w * M(s), M(s))`` at the current scores, computed once until the next step.

        Validation, the sparsity log (a callback, run before this module's ``on_train_epoch_end``)
        and the epoch's density share one mask computation.
        """
        if self._eval_weights is None:
            with torch.inference_mode(False), torch.no_grad():
                masks = self.method.masks()
                self._eval_weights = self._frozen(masks)
                self._eval_masks = masks
        return self._eval_weights, self._eval_masks

    def _frozen(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``w * M`` without a graph to the scores: what attacks and accuracy forwards use."""
        return self.method.effective_weights(self.model, masks, differentiable=False)

    def _adversarial(self, weights: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return self.training_attack(self.net(weights), x, y)

    def _loss(self, masks: Mapping[str, Tensor], x: Tensor, x_adv: Tensor, y: Tensor) -> LossOutput:
        weights = self.method.effective_weights(self.model, masks, differentiable=True)
        out = self.robust_loss(self.net(weights), x, x_adv, y)
        extra = self.method.extra_loss()
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
        masks = self.method.masks()
        at_s = self._frozen(masks)  # once per step: the attack and the clean-accuracy forward share it
        # Adversarial examples for the masked network at the current scores s.
        x_adv = self._adversarial(at_s, x, y)
        opt.zero_grad()
        if not self.s2ap_active():
            out = self._loss(masks, x, x_adv, y)  # the base method: one gradient at s
            self.manual_backward(out.loss)
        else:
            scores = dict(self.method.items())
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
                perturbed_masks = self.method.masks()
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
        self.method.after_optimizer_step()
        self._eval_weights = None
        return out.loss.detach()

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        for name, score in self.method.items():
            if not torch.isfinite(score).all():
                raise FloatingPointError(
                    f"{type(self).__name__}: non-finite scores in {name} at epoch "
                    f"{self.current_epoch}, step {self.global_step}; the last good checkpoint is kept"
                )
        # Cached for evaluation and the per-layer sparsity log: one mask computation per epoch.
        _, masks = self._evaluated()
        density = self.method.density(masks)

        self.log("prune/density", density, sync_dist=True)
        for name, value in self.method.end_of_epoch(density, self.current_epoch).items():
            self.log(name, value, sync_dist=True)
        super().on_train_epoch_end()

    def on_train_end(self) -> None:
        message = self.method.end_of_search_warning()
        if message:
            rank_zero_warn(message)

    def within_budget(self) -> bool:
        """Whether this epoch's mask may become ``best.ckpt`` (see ``BestCheckpoint``); the method says."""
        return self.method.within_budget()

    def objective(self) -> SearchObjective:
        """What this search minimises, for the analyses and the mask tracker, without the stage.

        The plain model, the base method (scores and masks), the robust loss and its training
        adversary: an analysis of a checkpoint measures exactly the search's function, and depends
        on this value rather than on the Lightning module.
        """
        return SearchObjective(self.model, self.method, self.robust_loss, self.threat)
