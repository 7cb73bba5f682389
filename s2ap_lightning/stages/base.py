"""What the three stages share: a plain model, a threat model, robust metrics and SGD + cosine.

Subclasses follow a ``configure_models`` / ``configure_losses`` / ``configure_metrics`` layout, and
override :meth:`RobustTask.weights_for_eval` when the network they evaluate is not the plain model
as it stands (the mask search evaluates ``w * M(s)``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from s2ap_lightning.attacks import AttackConfig, attack_context, build_robust_loss, eval_mode, pgd_ce
from s2ap_lightning.attacks.losses import ROBUST_LOSSES, LossOutput
from s2ap_lightning.checkpoint import check_loadable, load_weights
from s2ap_lightning.checks import check_range
from s2ap_lightning.data.subsets import dataset_labels
from s2ap_lightning.evaluation import (
    EvalProtocol,
    EvalRecord,
    MaskedModel,
    aa_membership,
    autoattack_plan,
    evaluate_batch,
    summarise,
    write_record,
)
from s2ap_lightning.evaluation.autoattack import AA_VERSIONS
from s2ap_lightning.evaluation.record import git_commit, plain
from s2ap_lightning.models import MODELS, build_model
from s2ap_lightning.models.compiled import ModelForward
from s2ap_lightning.pruning.scores import masked_forward, prunable_weight_names
from s2ap_lightning.stages.callbacks import EpochSummary, SlurmRequeue

#: Seed of the validation attack's random starts (plus the batch index); see ``validation_step``.
VALIDATION_SEED = 0

#: ``attack_precision`` values: fp32 attacks, or attacks at the Trainer's (autocast) precision.
ATTACK_PRECISIONS = ("fp32", "training")


class RobustTask(L.LightningModule):
    """Base class of the stages.

    Args:
        model: architecture name (``small_cnn``, ``resnet18``, ``vgg16_bn``, ``wrn28_4``).
        num_classes: output classes (linked from the DataModule by the CLI).
        in_channels: input channels (linked from the DataModule by the CLI).
        mean: per-channel input mean for normalisation inside the model (None: no normalisation).
        std: per-channel input std, with ``mean``.
        robust_loss: ``pgd_at``, ``trades`` or ``mart``.
        beta: TRADES/MART trade-off.
        eps: attack budget (L-inf: 8/255 for CIFAR/SVHN; 0.1 for digits).
        step_size: PGD step size for training and validation attacks.
        attack_steps: PGD steps for training and validation attacks.
        norm: ``linf`` or ``l2``.
        eval_pgd_steps: PGD steps of the test-time attack.
        eval_pgd_restarts: random restarts of the test-time attack.
        lr: SGD learning rate (cosine-annealed per epoch).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        init_from: checkpoint of the previous stage, or a plain state dict, loaded before training;
            distinct from the Trainer's ``ckpt_path``, which resumes this same stage.
        image_size: input side (linked from the DataModule by the CLI; the ViT needs it).
        channels_last: NHWC memory format for model and inputs (faster convolutions on recent GPUs).
        aa_images: test images attacked with AutoAttack by ``s2ap test``: a class-stratified sample
            drawn with ``aa_seed`` (0 skips AutoAttack). Clean and PGD accuracy use the whole test split.
        aa_batch_size: AutoAttack batch size.
        aa_version: AutoAttack version (``standard``, ``plus``, ``rand``); attacks not defined for
            the class count are skipped and recorded.
        aa_seed: seed of the AutoAttack sample.
        check_tolerance: noise allowed by the gradient-masking checks, as a fraction of the images
            compared (at least one image).
        attack_precision: precision of the training attacks: ``fp32`` (autocast off, the default)
            or ``training`` (the Trainer's precision: bf16 autocast under ``bf16-mixed``, half the
            bytes and the faster matrix units per attack step on GPUs). Validation, ``s2ap test``,
            AutoAttack and the analyses always attack in fp32, so evaluations never depend on it.
        compile: run the model through ``torch.compile`` in training attacks and losses (masks stay
            functional, so a new mask never recompiles); the first steps pay the compilation. Where
            compiling is unsupported, training runs eager after one warning.

    """

    def __init__(
        self,
        model: str = "small_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        robust_loss: str = "pgd_at",
        beta: float = 6.0,
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        attack_steps: int = 10,
        norm: str = "linf",
        eval_pgd_steps: int = 50,
        eval_pgd_restarts: int = 1,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        init_from: str | None = None,
        image_size: int = 32,
        channels_last: bool = False,
        aa_images: int = 1000,
        aa_batch_size: int = 500,
        aa_version: str = "standard",
        aa_seed: int = 0,
        check_tolerance: float = 0.005,
        attack_precision: str = "fp32",
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.validate_hparams()
        self._restored = False
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    # ----------------------------------------------------------------- configuration
    def validate_hparams(self) -> None:
        """Fail before any training on a value outside its valid range."""
        hp = self.hparams
        if hp.model not in MODELS:
            raise ValueError(f"unknown model {hp.model!r}; valid: {', '.join(sorted(MODELS))}")
        if hp.robust_loss not in ROBUST_LOSSES:
            raise ValueError(f"unknown robust_loss {hp.robust_loss!r}; valid: {', '.join(ROBUST_LOSSES)}")
        check_range("num_classes", hp.num_classes, 2, None)
        check_range("in_channels", hp.in_channels, 1, None)
        check_range("eps", hp.eps, 0.0, None)
        check_range("step_size", hp.step_size, 0.0, None)
        check_range("attack_steps", hp.attack_steps, 1, None)
        check_range("eval_pgd_steps", hp.eval_pgd_steps, 1, None)
        check_range("eval_pgd_restarts", hp.eval_pgd_restarts, 1, None)
        check_range("beta", hp.beta, 0.0, None)
        check_range("lr", hp.lr, 0.0, None, low_open=True)
        check_range("momentum", hp.momentum, 0.0, 1.0, high_open=True)
        check_range("weight_decay", hp.weight_decay, 0.0, None)
        check_range("aa_images", hp.aa_images, 0, None)
        check_range("aa_batch_size", hp.aa_batch_size, 1, None)
        check_range("check_tolerance", hp.check_tolerance, 0.0, 1.0, high_open=True)
        if hp.attack_precision not in ATTACK_PRECISIONS:
            raise ValueError(
                f"attack_precision={hp.attack_precision!r} is unknown; valid: {', '.join(ATTACK_PRECISIONS)}"
            )
        if hp.aa_version not in AA_VERSIONS:
            raise ValueError(f"aa_version={hp.aa_version!r} is unknown; valid: {', '.join(AA_VERSIONS)}")
        if hp.norm == "linf":
            # Inputs are images in [0, 1]: an L-inf budget above 1 allows any image at all.
            check_range("eps", hp.eps, 0.0, 1.0)
            check_range("step_size", hp.step_size, 0.0, 1.0)
            if hp.eps > 0 and hp.step_size > hp.eps:
                rank_zero_warn(
                    f"step_size={hp.step_size:g} is larger than eps={hp.eps:g}: every PGD step jumps to "
                    "the corners of the L-inf ball (common choices: eps/4 for PGD-10, 2.5 * eps / steps)"
                )
        self.train_attack = AttackConfig(hp.eps, hp.step_size, hp.attack_steps, hp.norm)

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = build_model(hp.model, hp.num_classes, hp.in_channels, hp.mean, hp.std, hp.image_size)
        # How training attacks and losses call the model (eager or compiled); not a submodule, so
        # the state dict stays the plain model's.
        self.forward_fn = ModelForward(self.model, compile=hp.compile)

    def configure_losses(self) -> None:
        self.robust_loss = build_robust_loss(self.hparams.robust_loss, self.hparams.beta)

    def configure_metrics(self) -> None:
        def acc() -> MulticlassAccuracy:
            return MulticlassAccuracy(self.hparams.num_classes, average="micro")

        self.train_robust_acc, self.train_clean_acc = acc(), acc()
        self.val_clean_acc, self.val_robust_acc = acc(), acc()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.trainable_parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ----------------------------------------------------------------- stage hand-off
    def check_trainer(self, trainer: L.Trainer) -> None:
        """Checks that need the Trainer's settings; the CLI runs them before anything is written."""
        epochs = trainer.max_epochs
        if epochs is not None and (epochs == 0 or epochs < -1):
            raise ValueError(
                f"trainer.max_epochs={epochs} is out of range: valid are >= 1, or -1 with max_steps"
            )
        if self.hparams.attack_precision == "training" and str(trainer.precision) == "16-mixed":
            raise ValueError(
                f"attack_precision='training' with trainer.precision={trainer.precision!r}: fp16 attacks "
                "have no loss scaling, so input gradients underflow; use precision bf16-mixed or "
                "attack_precision fp32"
            )

    def preflight(self, trainer: L.Trainer, stage: str) -> None:
        """Every check that can fail a run, done before the Trainer writes anything (logs, configs)."""
        if stage == "fit":
            self.check_trainer(trainer)
        if self.hparams.init_from and not self._restored:
            checkpoint, weights = check_loadable(self.model, self.hparams.init_from)
            self.check_handoff(checkpoint, weights)

    #: What the data decides about a model: a source trained on other data does not fit this run.
    DATA_KEYS = ("image_size", "in_channels", "num_classes")

    def check_handoff(self, checkpoint: Any, weights: Mapping[str, Tensor]) -> None:
        """Fail on a previous stage trained on other data (the weights may fit while the inputs do not).

        An 8x8-digits checkpoint loads into a 28x28 model whose layers have the same shapes; the
        checkpoint's hyper-parameters say what it was trained on. Stages add their own checks.
        """
        saved = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        if not isinstance(saved, dict):
            return  # a plain state dict (ours or a reference's) says nothing about its data
        for key in self.DATA_KEYS:
            if key in saved and saved[key] != self.hparams[key]:
                raise ValueError(
                    f"init_from={self.hparams.init_from!r} was trained with {key}={saved[key]}, but this "
                    f"run's data gives {key}={self.hparams[key]}: pass a checkpoint trained on this data "
                    "(or the data it was trained on)"
                )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            self.check_trainer(self.trainer)
        if self.hparams.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.hparams.init_from and not self._restored:
            obj = load_weights(self.model, self.hparams.init_from)
            self.on_init_from(obj)
            self._restored = True

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.hparams.channels_last and batch[0].dim() == 4:
            return (batch[0].contiguous(memory_format=torch.channels_last), *batch[1:])
        return batch

    def configure_callbacks(self) -> list[L.Callback]:
        # The epoch summary for batch logs, and SLURM requeue at a batch boundary (idle outside SLURM).
        wanted = (EpochSummary, SlurmRequeue)
        return [kind() for kind in wanted if not any(isinstance(c, kind) for c in self.trainer.callbacks)]

    def on_init_from(self, checkpoint: Any) -> None:
        """Hook for stages that take more than the weights from the previous stage."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Which stage wrote it: the next stage's hand-off check names it.
        checkpoint["s2ap_stage"] = type(self).__name__
        # RNG states, so that a resumed run draws the same attack starts as an uninterrupted one.
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # State restored from this stage's own checkpoint wins over `init_from`.
        self._restored = True
        # What the model was trained with: an evaluation record keeps it apart from what was tested.
        self._trained_hparams = dict(checkpoint.get("hyper_parameters") or {})
        # Applied when training resumes (after the sanity check, which draws random attack starts).
        self._pending_rng = checkpoint.get("rng")

    def on_train_start(self) -> None:
        rng = getattr(self, "_pending_rng", None)
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self._pending_rng = None

        # Mid-epoch resume: Lightning restarts the loader at its first batch; skip what was used.
        # `processed`, not `completed`: step checkpoints are written before the batch counts as completed.
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

        data = getattr(self.trainer, "datamodule", None)
        if 0 < done < self.trainer.num_training_batches and hasattr(data, "skip_train_batches"):
            data.skip_train_batches(done)

    # ----------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.trainer.world_size > 1:
            broadcast_buffers(self.model)

    def net(self, weights: Mapping[str, Tensor] | None = None) -> Callable[[Tensor], Tensor]:
        """The model as training attacks and losses call it, ``weights`` substituted (compiled or not)."""
        return self.forward_fn.bind(weights)

    def training_attack(self, model_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
        """The robust loss's own adversarial examples, at ``attack_precision``."""
        autocast = self.hparams.attack_precision == "training"
        return self.robust_loss.adversarial(model_fn, x, y, self.train_attack, self.model, autocast=autocast)

    def logs_this_step(self) -> bool:
        """Whether Lightning writes this step's logged values (every ``log_every_n_steps``).

        Training clean accuracy costs an extra forward for losses that do not compute clean logits
        (PGD-AT); it is computed only on the steps whose values reach the logger.
        """
        if self._trainer is None:
            return True
        every = int(self.trainer.log_every_n_steps)
        # Lightning's test (LoggerConnector.should_update_logs) with global_step for its count of
        # stepped batches: the same number before this batch's optimiser step, since every stage
        # steps once per batch (or per accumulation window, as Lightning counts too).
        return every > 0 and ((self.global_step + 1) % every == 0 or self.trainer.should_stop)

    def log_training(self, out: LossOutput, y: Tensor, clean_logits: Callable[[], Tensor]) -> None:
        """Log loss, clean and robust training accuracy; stop on a non-finite loss.

        Clean accuracy reuses the loss's clean logits where it has them (TRADES, MART); otherwise
        ``clean_logits`` is called without gradients and in eval mode (so BatchNorm statistics are
        not touched), on the steps Lightning logs only (:meth:`logs_this_step`).
        """
        loss, logits_adv = out.loss, out.logits_adv
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite training loss {loss.item()} at epoch "
                f"{self.current_epoch}, step {self.global_step}; the last good checkpoint is kept. "
                "Lower the learning rate or check the data."
            )
        self.train_robust_acc(logits_adv.detach(), y)
        clean = out.logits_clean
        if clean is None and self.logs_this_step():
            with torch.no_grad(), eval_mode(self.model):
                clean = clean_logits()
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/robust_acc", self.train_robust_acc)
        if clean is not None:
            self.train_clean_acc(clean.detach(), y)
            self.log("train/clean_acc", self.train_clean_acc)

    def on_train_epoch_end(self) -> None:
        self.log_layer_sparsity()

    def log_layer_sparsity(self) -> None:
        """Per-layer and global sparsity (exact zeros) of the network this stage evaluates.

        The same on every rank; ``sync_dist`` (one small all-reduce per value, on every rank at the
        epoch's end) keeps Lightning from warning that epoch-level values are not reduced.
        """
        with torch.no_grad():
            substituted = self.weights_for_eval()
            params = dict(self.model.named_parameters())
            zeros = total = 0
            for name in prunable_weight_names(self.model):
                w = substituted.get(name, params[name])
                z = int((w == 0).sum())
                zeros, total = zeros + z, total + w.numel()
                self.log(f"sparsity/{name}", z / w.numel(), sync_dist=True)
            self.log("sparsity/global", zeros / max(total, 1), sync_dist=True)

    # ----------------------------------------------------------------- evaluation

    def weights_for_eval(self) -> Mapping[str, Tensor]:
        """Weights substituted into the plain model when it is evaluated (none by default)."""
        return {}

    def forward(self, x: Tensor) -> Tensor:
        return masked_forward(self.model, self.weights_for_eval(), x)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Clean and PGD accuracy (the training attack) of the evaluated network: model selection.

        The attack's random starts come from a generator of their own, seeded by the batch index: the
        training stream of random numbers never depends on whether (or how often) validation ran, so
        a run resumed from a checkpoint written before an epoch's validation (which Lightning then
        does not repeat) draws the same attack starts as the uninterrupted run; and every epoch's
        validation uses the same starts, so epochs are compared on the same attack.
        """
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), attack_context(self.model):
            torch.manual_seed(VALIDATION_SEED + batch_idx)
            # Clones: tensors made under inference mode cannot enter an autograd graph.
            x, y = batch[0].clone(), batch[1].clone()
            weights = self.weights_for_eval()

            def model_fn(inp: Tensor) -> Tensor:
                return masked_forward(self.model, weights, inp)

            with torch.no_grad():
                clean = model_fn(x)
            x_adv = pgd_ce(model_fn, x, y, self.train_attack)
            with torch.no_grad():
                robust = model_fn(x_adv)
        self.val_clean_acc(clean, y)
        self.val_robust_acc(robust, y)
        self.log("val/clean_acc", self.val_clean_acc, prog_bar=True)
        self.log("val/robust_acc", self.val_robust_acc, prog_bar=True)

    # ----------------------------------------------------------------- test: the full protocol
    @property
    def eval_protocol(self) -> EvalProtocol:
        """The evaluation protocol these hyper-parameters ask for (``s2ap test``)."""
        hp = self.hparams
        return EvalProtocol(
            eps=hp.eps,
            step_size=hp.step_size,
            norm=hp.norm,
            pgd_steps=hp.eval_pgd_steps,
            pgd_restarts=hp.eval_pgd_restarts,
            aa_images=hp.aa_images,
            aa_version=hp.aa_version,
            aa_batch_size=hp.aa_batch_size,
            subset_seed=hp.aa_seed,
            tolerance=hp.check_tolerance,
        )

    def on_test_start(self) -> None:
        # Decided before any attack runs: which images AutoAttack sees (seeded, class-stratified) and
        # which of its attacks are defined for this class count.
        data = getattr(self.trainer, "datamodule", None)
        if data is None or getattr(data, "test_set", None) is None:
            raise ValueError("s2ap test needs the RobustDataModule (its test split names the images)")
        protocol = self.eval_protocol
        self._test_labels = dataset_labels(data.test_set)
        self._aa_member = aa_membership(self._test_labels, protocol)
        self._aa_plan = (
            autoattack_plan(self.hparams.num_classes, protocol.aa_version) if protocol.aa_images else None
        )
        if self._aa_plan is not None and self._aa_plan.skipped:
            self.print(self._aa_plan.describe())
        self.print(self.threat_model_line())
        self._test_flags: list[dict[str, Tensor]] = []
        self._aa_warnings: list[str] = []

    def threat_model_line(self) -> str:
        """What this evaluation attacks with, and what the model was trained at when that differs."""
        p, hp = self.eval_protocol, self.hparams
        aa = f"AutoAttack {p.aa_version} on {p.aa_images} images" if p.aa_images else "no AutoAttack"
        line = (
            f"threat model: {p.norm} eps {p.eps:g}; PGD-{p.pgd_steps} (step {p.step_size:g}, "
            f"{p.pgd_restarts} restart(s)); {aa}"
        )
        trained = getattr(self, "_trained_hparams", None) or {}
        was = (trained.get("norm", hp.norm), trained.get("eps", hp.eps))
        if was != (p.norm, p.eps):
            line += f". NOT the training threat model ({was[0]} eps {was[1]:g})"
        return line

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y, index = batch
        model = MaskedModel(self.model, self.weights_for_eval())
        in_aa = self._aa_member[index.cpu()]
        flags, warnings = evaluate_batch(
            model, x, y, self.eval_protocol, self._aa_plan, in_aa, seed=self.hparams.aa_seed + batch_idx
        )
        self._test_flags.append({**flags, "index": index})
        self._aa_warnings += [w for w in warnings if w not in self._aa_warnings]

    def on_test_epoch_end(self) -> None:
        flags = {k: torch.cat([f[k] for f in self._test_flags]) for k in self._test_flags[0]}
        if self.trainer.world_size > 1:
            # Every rank's flags, by image index: the distributed sampler's padding repeats images,
            # which are counted once here.
            gathered = self.all_gather({k: v.long() for k, v in flags.items()})  # gloo has no bool
            flags = {k: v.reshape(-1) if k == "index" else v.reshape(-1).bool() for k, v in gathered.items()}
        index, first = _first_occurrence(flags.pop("index").cpu())
        flags = {k: v.cpu()[first] for k, v in flags.items()}
        record = summarise(
            flags, self._test_labels[index], self.eval_protocol, self._aa_plan, self._aa_warnings
        )
        names = {"clean_acc": "clean_acc", "pgd_acc": "robust_acc", "pgd_fewer_acc": "pgd10_acc"}
        for key in ("clean_acc", "pgd_acc", "pgd_fewer_acc", "eps0_acc", "aa_acc"):
            if getattr(record, key) is not None:
                self.log(f"test/{names.get(key, key)}", getattr(record, key), rank_zero_only=True)
        # In Lightning's table of test figures, beside them: the budget they were measured at.
        self.log("test/eps", float(self.eval_protocol.eps), rank_zero_only=True)
        self.log("test/pgd_steps", float(self.eval_protocol.pgd_steps), rank_zero_only=True)
        for failure in record.failures():
            rank_zero_warn(
                f"EVALUATION CHECK FAILED ({failure}). The robust accuracy may be overestimated "
                "(gradient masking or a broken evaluation)."
            )
        path = self.record_path()  # on every rank: trainer.log_dir is a collective call under DDP
        if self.trainer.is_global_zero:
            write_record(path, self.evaluation_record(record))
            self.print(f"evaluation written to {path}")
        # Every rank waits for the record: no rank leaves (and tears its process group down) while
        # rank 0 still writes, which once aborted a spawned rank ("terminate called ...").
        self.trainer.strategy.barrier("s2ap evaluation record")

    def record_path(self) -> Path:
        """``<checkpoint>.eval.json`` beside an evaluated checkpoint, else ``eval.json`` in the log dir.

        A record is never replaced: a second evaluation of the same checkpoint (another threat model,
        a quick PGD-only look after a long AutoAttack run) writes ``<checkpoint>.eval.2.json``, etc.
        """
        ckpt = getattr(self.trainer, "ckpt_path", None)
        if ckpt:
            first = Path(ckpt).with_suffix(".eval.json")
        else:
            first = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "eval.json"
        return unused_record_path(first)

    def evaluation_record(self, record: EvalRecord) -> dict[str, Any]:
        """The JSON record: figures, what they rest on, checks, and everything to reproduce them."""
        trainer = self.trainer
        data = getattr(trainer, "datamodule", None)
        ckpt = getattr(trainer, "ckpt_path", None)
        trained = getattr(self, "_trained_hparams", None) or dict(self.hparams)
        return {
            "checkpoint": str(ckpt) if ckpt else None,
            "stage": type(self).__name__,
            **record.as_dict(),
            "test_subset": getattr(data, "test_subset_info", None),
            "seed": os.environ.get("PL_GLOBAL_SEED"),
            "dataset": plain(dict(data.hparams)) if data is not None else None,
            # As trained (the checkpoint's); what was evaluated is `protocol` above.
            "hyper_parameters": plain(trained),
            "trained_threat_model": {k: trained.get(k) for k in ("norm", "eps", "step_size", "attack_steps")},
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "git_commit": git_commit(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def saved_stage(checkpoint: Any) -> str | None:
    """The stage that wrote a checkpoint (recorded by :meth:`RobustTask.on_save_checkpoint`), if known."""
    return checkpoint.get("s2ap_stage") if isinstance(checkpoint, dict) else None


def unused_record_path(first: Path) -> Path:
    """``first`` if it does not exist yet, else ``<stem>.2.json``, ``<stem>.3.json``, ... (the first free)."""
    path, n = first, 1
    while path.exists():
        n += 1
        path = first.with_name(f"{first.name.removesuffix('.json')}.{n}.json")
    return path


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers (BatchNorm running statistics) on every rank, one broadcast per dtype.

    DDP's own ``broadcast_buffers`` only acts when the wrapped module's forward runs, and the stages
    call the plain model functionally (masks substituted), so without this each rank would keep the
    statistics of its own shard: validation on rank 1 would judge a network other than the one saved,
    and a resumed run (every rank loads rank 0's statistics) would differ from an uninterrupted one.
    Called at the start of every training step, as DDP would before its forward; all ranks call it.
    """
    groups: dict[torch.dtype, list[Tensor]] = {}
    for buffer in module.buffers():
        groups.setdefault(buffer.dtype, []).append(buffer)
    for tensors in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        torch.distributed.broadcast(flat, src=src)
        offset = 0
        for t in tensors:
            t.data.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def _first_occurrence(index: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique indices and the position of each one's first occurrence in ``index``."""
    unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
    positions = torch.arange(len(index))
    first = torch.full((len(unique),), len(index), dtype=torch.long).scatter_reduce(
        0, inverse, positions, reduce="amin"
    )
    return unique, first
