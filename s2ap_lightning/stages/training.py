"""What the stages share beside the training loop: checks before training, per-step training logs.

Kept out of :class:`~s2ap_lightning.stages.base.RobustTask` so the task holds the loop only. Each
check fails before anything is written, naming the bad value and what is valid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from s2ap_lightning.attacks import attack_context, eval_mode, pgd_ce
from s2ap_lightning.attacks.losses import LossOutput
from s2ap_lightning.checks import check_range

#: ``attack_precision`` values: fp32 attacks, or attacks at the Trainer's (autocast) precision.
ATTACK_PRECISIONS = ("fp32", "training")

#: Seed of the validation attack's random starts (plus the batch index); see :func:`validate`.
VALIDATION_SEED = 0

#: What the data decides about a model: a source trained on other data does not fit this run.
DATA_KEYS = ("image_size", "in_channels", "num_classes")


def check_stage_options(hp: Mapping[str, Any]) -> None:
    """The options every stage takes, each in its range; the typed blocks validate themselves."""
    check_range("num_classes", hp["num_classes"], 2, None)
    check_range("in_channels", hp["in_channels"], 1, None)
    check_range("beta", hp["beta"], 0.0, None)
    check_range("lr", hp["lr"], 0.0, None, low_open=True)
    check_range("momentum", hp["momentum"], 0.0, 1.0, high_open=True)
    check_range("weight_decay", hp["weight_decay"], 0.0, None)
    if hp["attack_precision"] not in ATTACK_PRECISIONS:
        raise ValueError(
            f"attack_precision={hp['attack_precision']!r} is unknown; valid: {', '.join(ATTACK_PRECISIONS)}"
        )


def check_trainer_settings(trainer: L.Trainer, attack_precision: str) -> None:
    """Trainer settings a stage cannot run with: no epochs, or fp16 attacks (no loss scaling)."""
    epochs = trainer.max_epochs
    if epochs is not None and (epochs == 0 or epochs < -1):
        raise ValueError(f"trainer.max_epochs={epochs} is out of range: valid are >= 1, or -1 with max_steps")
    if attack_precision == "training" and str(trainer.precision) == "16-mixed":
        raise ValueError(
            f"attack_precision='training' with trainer.precision={trainer.precision!r}: fp16 attacks "
            "have no loss scaling, so input gradients underflow; use precision bf16-mixed or "
            "attack_precision fp32"
        )


def check_same_data(init_from: str, checkpoint: Any, hparams: Mapping[str, Any]) -> None:
    """Fail on a previous stage trained on other data (the weights may fit while the inputs do not).

    An 8x8-digits checkpoint loads into a 28x28 model whose layers have the same shapes; the
    checkpoint's hyper-parameters say what it was trained on. A plain state dict (ours or a
    reference's) says nothing about its data and passes.
    """
    saved = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict):
        return
    for key in DATA_KEYS:
        if key in saved and saved[key] != hparams[key]:
            raise ValueError(
                f"init_from={init_from!r} was trained with {key}={saved[key]}, but this run's data gives "
                f"{key}={hparams[key]}: pass a checkpoint trained on this data (or the data it was "
                "trained on)"
            )


def logged_step(trainer: L.Trainer, global_step: int) -> bool:
    """Whether Lightning writes the logged values of the step after ``global_step`` optimiser steps.

    Lightning's own test (``LoggerConnector.should_update_logs``), with ``global_step`` for its count
    of stepped batches: the same number before this batch's optimiser step, since every stage steps
    once per batch. Training clean accuracy costs an extra forward for losses without clean logits
    (PGD-AT), so it is computed only on these steps.
    """
    every = int(trainer.log_every_n_steps)
    return every > 0 and ((global_step + 1) % every == 0 or trainer.should_stop)


def log_training(
    module: L.LightningModule, out: LossOutput, y: Tensor, clean_logits: Callable[[], Tensor]
) -> None:
    """Log a stage's loss, clean and robust training accuracy; stop on a non-finite loss.

    Clean accuracy reuses the loss's clean logits where it has them (TRADES, MART); otherwise
    ``clean_logits`` is called without gradients and in eval mode (BatchNorm statistics untouched),
    on the steps whose values reach the logger only (:func:`logged_step`).
    """
    loss = out.loss
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{type(module).__name__}: non-finite training loss {loss.item()} at epoch "
            f"{module.current_epoch}, step {module.global_step}; the last good checkpoint is kept. "
            "Lower the learning rate or check the data."
        )
    module.train_robust_acc(out.logits_adv.detach(), y)
    clean = out.logits_clean
    if clean is None and (module._trainer is None or logged_step(module.trainer, module.global_step)):
        with torch.no_grad(), eval_mode(module.model):
            clean = clean_logits()
    module.log("train/loss", loss.detach(), prog_bar=True)
    module.log("train/robust_acc", module.train_robust_acc)
    if clean is not None:
        module.train_clean_acc(clean.detach(), y)
        module.log("train/clean_acc", module.train_clean_acc)


def validate(module: L.LightningModule, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
    """Log clean and PGD accuracy (the training threat) of ``module.evaluated_network()``.

    The attack's random starts come from a forked RNG seeded by the batch index: the training stream
    of random numbers never depends on whether (or how often) validation ran, so a resumed run draws
    the same attack starts as an uninterrupted one, and every epoch is judged on the same starts.
    """
    cuda = [module.device.index or 0] if module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), attack_context(module.model):
        torch.manual_seed(VALIDATION_SEED + batch_idx)
        # Clones: tensors made under inference mode cannot enter an autograd graph.
        x, y = batch[0].clone(), batch[1].clone()
        network = module.evaluated_network()
        with torch.no_grad():
            clean = network(x)
        x_adv = pgd_ce(network, x, y, module.threat)
        with torch.no_grad():
            robust = network(x_adv)
    module.val_clean_acc(clean, y)
    module.val_robust_acc(robust, y)
    module.log("val/clean_acc", module.val_clean_acc, prog_bar=True)
    module.log("val/robust_acc", module.val_robust_acc, prog_bar=True)
