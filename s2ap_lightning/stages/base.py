"""What the three stages share: a plain model, a threat model, robust metrics and SGD + cosine.

The stage holds the typed blocks it is configured with (:class:`~s2ap_lightning.attacks.ThreatModel`,
:class:`~s2ap_lightning.evaluation.EvalProtocol`) and the training loop; everything else is a
callback it adds (:meth:`RobustTask.configure_callbacks`): exact resume, DDP buffer broadcast,
sparsity logs, SLURM requeue, and the evaluation of ``s2ap test``. Subclasses override
:meth:`RobustTask.evaluated_weights` when the network they evaluate is not the plain model as it
stands (the mask search evaluates ``w * M(s)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from s2ap_lightning.attacks import ThreatModel, build_robust_loss
from s2ap_lightning.attacks.losses import LossOutput
from s2ap_lightning.checkpoint import check_loadable, load_weights
from s2ap_lightning.evaluation import EvalProtocol, EvaluationCallback, MaskedModel
from s2ap_lightning.models import build_model
from s2ap_lightning.models.compiled import ModelForward
from s2ap_lightning.pruning.scores import masked_forward
from s2ap_lightning.stages.callbacks import (
    BroadcastBuffers,
    EpochSummary,
    ResumeState,
    SlurmRequeue,
    SparsityLog,
)
from s2ap_lightning.stages.hparams import as_block, plain_value, split_legacy, upgrade_checkpoint_hparams
from s2ap_lightning.stages.training import (
    check_same_data,
    check_stage_options,
    check_trainer_settings,
    log_training,
    validate,
)


class RobustTask(L.LightningModule):
    """Base class of the stages: the plain model, the threat model, the robust loss, SGD + cosine.

    Args:
        model: architecture name (``small_cnn``, ``mlp``, ``resnet18``, ``vgg16_bn``, ``wrn28_4``, ...).
        num_classes: output classes (the CLI links ``num_classes``, ``in_channels`` and ``image_size``
            from the DataModule).
        in_channels: input channels.
        image_size: input side (the ViT needs it).
        mean: per-channel input mean, normalised inside the model (None: no normalisation).
        std: per-channel input std, with ``mean``.
        threat: threat model of training, validation and (unless told otherwise) ``s2ap test``.
        robust_loss: ``pgd_at``, ``trades`` or ``mart``.
        beta: TRADES/MART trade-off.
        evaluation: how ``s2ap test`` evaluates (PGD steps, AutoAttack sample, seed, checks).
        lr: SGD learning rate (cosine-annealed per epoch).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        init_from: the previous stage's checkpoint or a plain state dict, loaded before training
            (the Trainer's ``ckpt_path`` resumes this same stage instead).
        channels_last: NHWC memory format for model and inputs (faster convolutions on recent GPUs).
        attack_precision: training attacks in ``fp32`` (default) or at the Trainer's precision
            (``training``); validation, ``s2ap test`` and the analyses always attack in fp32.
        compile: ``torch.compile`` the model in training attacks and losses (eager where unsupported).
        **legacy: flat options of checkpoints older than the blocks (``eps``, ``aa_seed``, ...).

    """

    def __init__(
        self,
        model: str = "small_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 32,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        threat: ThreatModel = ThreatModel(),
        robust_loss: str = "pgd_at",
        beta: float = 6.0,
        evaluation: EvalProtocol = EvalProtocol(),
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        init_from: str | None = None,
        channels_last: bool = False,
        attack_precision: str = "fp32",
        compile: bool = False,
        **legacy: Any,
    ) -> None:
        super().__init__()
        blocks = split_legacy(legacy, type(self).__name__)
        self.threat = as_block(ThreatModel, blocks.get("threat", threat))
        self.evaluation = as_block(EvalProtocol, blocks.get("evaluation", evaluation))
        self.save_hyperparameters()
        for key in legacy:
            self.hparams.pop(key, None)
        # Hyper-parameters stay primitive (a checkpoint loads with weights_only=True): the blocks as dicts.
        self.hparams.update(self.primitive_blocks())
        self._restored = False
        self.trained_hparams: dict[str, Any] = dict(self.hparams)
        self.validate_hparams()
        self.configure_models()
        self.robust_loss = build_robust_loss(robust_loss, beta)
        acc = lambda: MulticlassAccuracy(num_classes, average="micro")  # noqa: E731
        self.train_robust_acc, self.train_clean_acc = acc(), acc()
        self.val_clean_acc, self.val_robust_acc = acc(), acc()

    def primitive_blocks(self) -> dict[str, Any]:
        """The typed blocks as plain dicts, for ``hparams`` (subclasses add theirs)."""
        return {"threat": plain_value(self.threat), "evaluation": plain_value(self.evaluation)}

    # ----------------------------------------------------------------- configuration
    def validate_hparams(self) -> None:
        """Fail before any training on a stage option outside its range (the blocks check themselves)."""
        check_stage_options(self.hparams)

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = build_model(hp.model, hp.num_classes, hp.in_channels, hp.mean, hp.std, hp.image_size)
        # How training attacks and losses call the model (eager or compiled); not a submodule.
        self.forward_fn = ModelForward(self.model, compile=hp.compile)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.trainable_parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def configure_callbacks(self) -> list[L.Callback]:
        # Each unless the user configured one of the kind (with settings of their own).
        wanted = (EpochSummary, SlurmRequeue, ResumeState, BroadcastBuffers, SparsityLog, EvaluationCallback)
        return [kind() for kind in wanted if not any(isinstance(c, kind) for c in self.trainer.callbacks)]

    # ----------------------------------------------------------------- stage hand-off
    def check_trainer(self, trainer: L.Trainer) -> None:
        """Checks that need the Trainer's settings; the CLI runs them before anything is written."""
        check_trainer_settings(trainer, self.hparams.attack_precision)

    def preflight(self, trainer: L.Trainer, stage: str, from_checkpoint: bool = False) -> None:
        """Every check that can fail a run, before the Trainer writes anything.

        ``from_checkpoint``: this stage's own checkpoint is restored, so ``init_from`` is not read.
        """
        if stage == "fit":
            self.check_trainer(trainer)
        if from_checkpoint:
            self._restored = True  # the checkpoint's state wins; init_from is not read
        if self.hparams.init_from and not self._restored:
            checkpoint, weights = check_loadable(self.model, self.hparams.init_from)
            self.check_handoff(checkpoint, weights)

    def check_handoff(self, checkpoint: Any, weights: Mapping[str, Tensor]) -> None:
        """Fail on a previous stage trained on other data; stages add checks of their own."""
        check_same_data(self.hparams.init_from, checkpoint, self.hparams)

    def loads_init_from(self) -> bool:
        """Whether ``init_from`` is loaded: not when this stage's own checkpoint replaces it.

        Lightning restores ``ckpt_path`` after ``setup``; the CLI says so through :meth:`preflight`.
        """
        return bool(self.hparams.init_from) and not self._restored

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            self.check_trainer(self.trainer)
        if self.hparams.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.loads_init_from():
            self.on_init_from(load_weights(self.model, self.hparams.init_from))
            self._restored = True

    def on_init_from(self, checkpoint: Any) -> None:
        """Hook for stages that take more than the weights from the previous stage."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.hparams.channels_last and batch[0].dim() == 4:
            return (batch[0].contiguous(memory_format=torch.channels_last), *batch[1:])
        return batch

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Which stage wrote it: the next stage's hand-off check names it.
        checkpoint["s2ap_stage"] = type(self).__name__

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # State restored from this stage's own checkpoint wins over `init_from`.
        self._restored = True
        # What the model was trained with: an evaluation record keeps it apart from what was tested.
        self.trained_hparams = upgrade_checkpoint_hparams(checkpoint.get("hyper_parameters") or {})

    # ----------------------------------------------------------------- training
    def net(self, weights: Mapping[str, Tensor] | None = None) -> Callable[[Tensor], Tensor]:
        """The model as training attacks and losses call it, ``weights`` substituted (compiled or not)."""
        return self.forward_fn.bind(weights)

    def training_attack(self, model_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
        """The robust loss's own adversarial examples, at ``attack_precision``."""
        autocast = self.hparams.attack_precision == "training"
        return self.robust_loss.adversarial(model_fn, x, y, self.threat, self.model, autocast=autocast)

    def log_training(self, out: LossOutput, y: Tensor, clean_logits: Callable[[], Tensor]) -> None:
        """Log loss, clean and robust accuracy; stop on a non-finite loss (:func:`.training.log_training`)."""
        log_training(self, out, y, clean_logits)

    # ----------------------------------------------------------------- evaluation
    def evaluated_weights(self) -> Mapping[str, Tensor]:
        """Weights substituted into the plain model when it is evaluated (none by default)."""
        return {}

    def evaluated_network(self) -> nn.Module:
        """The network validation and ``s2ap test`` judge: the plain model, evaluated weights in."""
        return MaskedModel(self.model, self.evaluated_weights())

    def forward(self, x: Tensor) -> Tensor:
        return masked_forward(self.model, self.evaluated_weights(), x)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Clean and PGD accuracy (the training attack) of the evaluated network: model selection."""
        validate(self, batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing per batch: the EvaluationCallback runs ``evaluate()`` once on the whole test split."""


def saved_stage(checkpoint: Any) -> str | None:
    """The stage that wrote a checkpoint (recorded by :meth:`RobustTask.on_save_checkpoint`), if known."""
    return checkpoint.get("s2ap_stage") if isinstance(checkpoint, dict) else None
