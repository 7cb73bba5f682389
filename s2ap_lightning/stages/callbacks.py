"""The stages' callbacks: checkpoints, exact resume, SLURM requeueing, logs and the mask tracker.

Checkpoints every stage uses: the best by validation robust accuracy, and the last. Two callbacks
rather than ``save_last=True``: since Lightning 2.6, ``save_last`` only writes when the monitored
checkpoint was written in the same step, so a run whose robust accuracy stopped improving would
resume from a stale "last" checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torch.distributed import ReduceOp

from s2ap_lightning.checkpoint import atomic_torch_save
from s2ap_lightning.pruning.fixed_masks import PACKED_FORMAT, pack_masks
from s2ap_lightning.pruning.masks import hamming_distance
from s2ap_lightning.pruning.scores import prunable_weight_names

BEST = dict(
    filename="best",
    monitor="val/robust_acc",
    mode="max",
    save_top_k=1,
    save_last=False,
    enable_version_counter=False,
)
LAST = dict(filename="last", monitor=None, save_top_k=1, save_last=False, enable_version_counter=False)


class BestCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that only considers models within their stage's budget.

    A stage that can be over budget (HARP's learnt density) says so through ``within_budget()``; an
    over-budget epoch is neither saved nor compared, as in HARP's own model selection, so the best
    checkpoint never holds a larger mask than asked for. Stages without that method are always in.
    """

    @staticmethod
    def _eligible(pl_module: L.LightningModule) -> bool:
        check = getattr(pl_module, "within_budget", None)
        return check is None or bool(check())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._eligible(pl_module):
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._eligible(pl_module):
            super().on_validation_end(trainer, pl_module)


class StepCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` optimiser steps too (0, the default: off).

    Lightning's ``ModelCheckpoint`` takes either a step or an epoch interval, not both, so the
    per-epoch ``last.ckpt`` and the step one are two callbacks writing the same file; a long epoch
    killed without a signal then loses at most N steps, and the end of every epoch is still saved.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps={every_n_train_steps} must be >= 0 (0: off)")
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=0,
            **LAST,
        )


def checkpoint_callbacks(dirpath: str | None = None, every_n_train_steps: int = 0) -> list[ModelCheckpoint]:
    """``best.ckpt`` (validation robust accuracy, never test) and ``last.ckpt`` (for resume).

    ``last.ckpt`` is written at every epoch's end and, with ``every_n_train_steps``, every N steps.
    """
    return [
        BestCheckpoint(dirpath=dirpath, **BEST),
        ModelCheckpoint(dirpath=dirpath, **LAST),
        StepCheckpoint(dirpath=dirpath, every_n_train_steps=every_n_train_steps),
    ]


class EpochSummary(L.Callback):
    """One line per epoch when the progress bar is off (batch jobs, SLURM logs, `progress: false`).

    Without a bar a run would otherwise print nothing between start and end; with one, this is silent.
    """

    KEYS = ("train/loss", "train/robust_acc", "val/clean_acc", "val/robust_acc", "prune/density")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.progress_bar_callback is not None or not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        shown = "  ".join(f"{k} {float(metrics[k]):.4f}" for k in self.KEYS if k in metrics)
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        print(f"{type(pl_module).__name__} epoch {trainer.current_epoch + 1}/{total}  {shown}", flush=True)


def slurm_job_id() -> str | None:
    """The SLURM job's id as ``scontrol`` names it (``ARRAY_TASK`` for array jobs), or None."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def _hpc_numbers(folder: str | Path) -> list[int]:
    names = (re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name) for p in Path(folder).glob("hpc_ckpt_*.ckpt"))
    return [int(m.group(1)) for m in names if m]


def latest_hpc_checkpoint(folder: str | Path) -> Path | None:
    """The ``hpc_ckpt_<N>.ckpt`` with the highest N: the one Lightning's SLURM resume picks."""
    numbers = _hpc_numbers(folder)
    return Path(folder) / f"hpc_ckpt_{max(numbers)}.ckpt" if numbers else None


def next_hpc_checkpoint(folder: str | Path) -> Path:
    """``hpc_ckpt_<N+1>.ckpt``: the name the next requeue saves to (the highest N wins a resume)."""
    return Path(folder) / f"hpc_ckpt_{max(_hpc_numbers(folder), default=0) + 1}.ckpt"


class SlurmRequeue(Checkpoint):
    """SLURM auto-requeue that saves at a batch boundary, on every rank together.

    Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) saves the hpc checkpoint inside
    the signal handler, wherever the signal lands: in the middle of a training step (the checkpoint
    then holds a random-number state half-way through the step's attacks, or weights already stepped
    for a batch it does not count as processed, so the resumed run differs from an uninterrupted one)
    or, under DDP, while another rank waits in a collective (a hang). Here the signal only sets a flag;
    at the end of each training batch all ranks agree on it (one small all-reduce, only in a SLURM job
    with auto-requeue) and then save ``hpc_ckpt_<N>.ckpt`` into ``trainer.default_root_dir`` together
    (after the last batch of an epoch: once the epoch's validation and end-of-epoch hooks are done),
    which Lightning resumes from when the requeued job restarts. Rank 0 requeues the job with
    ``scontrol requeue``; the ranks then wait for SLURM to stop them instead of training on past the
    checkpoint. The checkpoint records the job id, so that the restarted job is recognised as the same
    run (and a different job into the same folder is not).

    Active when the Trainer's cluster environment is a ``SLURMEnvironment`` with ``auto_requeue``
    (Lightning's default inside a batch job); it replaces Lightning's handler of the requeue signal
    for the duration of ``fit``. Every stage adds it.

    Args:
        wait_s: how long to wait for SLURM to stop the job after the requeue before failing.

    """

    def __init__(self, wait_s: float = 600.0) -> None:
        self.wait_s = wait_s
        self._signalled = False
        self._at_epoch_end = False
        self._active = False
        self._signum: int | None = None
        self._previous: Any = None

    def _environment(self, trainer: L.Trainer) -> SLURMEnvironment | None:
        env = getattr(trainer.strategy, "cluster_environment", None)
        return env if isinstance(env, SLURMEnvironment) and env.auto_requeue else None

    def _handler(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = self._environment(trainer)
        self._active = env is not None  # the same on every rank: all of them join the vote below
        if env is None or threading.current_thread() is not threading.main_thread():
            return
        self._signum = int(env.requeue_signal or signal.SIGUSR1)
        self._previous = signal.signal(self._signum, self._handler)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, err: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._signum is not None:
            signal.signal(self._signum, self._previous)
            self._signum = None

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        job = slurm_job_id()
        if job is not None:
            checkpoint["slurm_job_id"] = job

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self._active:
            return
        # Every rank takes part, whether or not its own process has seen the signal yet.
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            return
        self._signalled = False
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # The epoch's validation and end-of-epoch updates (learning rate, mask cache, schedules)
            # still belong to this epoch: save once they are done, at the end of on_train_epoch_end.
            self._at_epoch_end = True
            return
        self._save_and_requeue(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A Checkpoint callback: Lightning calls this after the module's own on_train_epoch_end.
        if self._at_epoch_end:
            self._at_epoch_end = False
            self._save_and_requeue(trainer)

    def _save_and_requeue(self, trainer: L.Trainer) -> None:
        path = trainer.strategy.broadcast(str(next_hpc_checkpoint(trainer.default_root_dir)), src=0)
        trainer.save_checkpoint(path, weights_only=False)
        status = 0
        if trainer.is_global_zero:
            job = slurm_job_id()
            try:
                done = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True)
                status, why = done.returncode, done.stderr.strip()
            except FileNotFoundError:
                status, why = 127, "scontrol is not on PATH"
            if status:
                rank_zero_warn(f"`scontrol requeue {job}` failed ({why}); {path} is saved, training goes on")
            else:
                print(f"saved {path} and requeued SLURM job {job}; waiting to be stopped", flush=True)
        if trainer.strategy.broadcast(status, src=0):
            return
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            if trainer.received_sigterm:
                raise SIGTERMException()
            time.sleep(0.2)
        raise RuntimeError(f"job {slurm_job_id()} was requeued but not stopped within {self.wait_s:g} s")


class ResumeState(L.Callback):
    """What an exact resume needs beyond Lightning's own state: RNG streams and the epoch position.

    The RNG state goes into every checkpoint (``checkpoint["rng"]``, the key older checkpoints of this
    project used too) and is applied when training resumes, after the sanity check, which draws
    random attack starts of its own; so a resumed run draws the same attack starts as an
    uninterrupted one. Lightning restarts an interrupted epoch's loader at its first batch: the
    batches this rank already used are skipped through the DataModule's ``skip_train_batches``.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            torch.set_rng_state(self._pending["torch"])
            if "cuda" in self._pending and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._pending["cuda"])
            self._pending = None
        # `processed`, not `completed`: step checkpoints are written before the batch counts as completed.
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        data = getattr(trainer, "datamodule", None)
        if 0 < done < trainer.num_training_batches and hasattr(data, "skip_train_batches"):
            data.skip_train_batches(done)


class BroadcastBuffers(L.Callback):
    """Rank 0's BatchNorm statistics on every rank at the start of every training step.

    DDP's own ``broadcast_buffers`` only acts when the wrapped module's forward runs, and the stages
    call the plain model functionally (masks substituted), so without this each rank would keep the
    statistics of its own shard: validation on rank 1 would judge a network other than the one saved,
    and a resumed run (every rank loads rank 0's statistics) would differ from an uninterrupted one.
    """

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.world_size > 1:
            broadcast_buffers(pl_module.model)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers on every rank, one broadcast per dtype; every rank must call it."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        groups.setdefault(buffer.dtype, []).append(buffer)
    for tensors in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        torch.distributed.broadcast(flat, src=src)
        offset = 0
        for t in tensors:
            t.data.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


class SparsityLog(L.Callback):
    """Per-layer and global sparsity (exact zeros) of the network a stage evaluates, every epoch.

    Reads the stage's ``evaluated_weights()`` (the mask search: ``w * M(s)``). The values are the same
    on every rank; ``sync_dist`` (one small all-reduce per value, on every rank) keeps Lightning from
    warning that epoch-level values are not reduced.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            substituted = pl_module.evaluated_weights()
            params = dict(pl_module.model.named_parameters())
            zeros = total = 0
            for name in prunable_weight_names(pl_module.model):
                w = substituted.get(name, params[name])
                z = int((w == 0).sum())
                zeros, total = zeros + z, total + w.numel()
                pl_module.log(f"sparsity/{name}", z / w.numel(), sync_dist=True)
            pl_module.log("sparsity/global", zeros / max(total, 1), sync_dist=True)


class MaskStabilityCallback(L.Callback):
    """Logs, every mask-search epoch, the Hamming distance to the previous epoch's mask.

    Logged as ``mask/hamming`` (global) and ``mask/hamming/<layer>``; masks are saved per epoch as
    packed bits under ``dirpath`` (default: ``<log dir>/masks``, nothing saved without a logger), as
    ``init.pt`` (the mask search's starting mask) and ``epoch_NNN.pt``. The search module must offer
    ``objective()`` (``ScoreSpaceSAMPruner`` does); its base method computes the masks.
    """

    def __init__(self, dirpath: str | None = None, save_masks: bool = True) -> None:
        self.dirpath = dirpath
        self.save_masks = save_masks
        self.previous: dict[str, Tensor] | None = None
        self.history: list[dict[str, Any]] = []

    def _masks(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        with torch.no_grad():
            return {n: m.detach().cpu() for n, m in pl_module.objective().method.masks().items()}

    def _save(self, trainer: L.Trainer, masks: dict[str, Tensor], tag: str) -> None:
        if not self.save_masks:
            return
        if self.dirpath is None and trainer.logger is None:
            return  # no logger and no folder given: nowhere sensible to write
        # `trainer.log_dir` is a collective under DDP (a broadcast from rank 0): every rank reads it,
        # and only then does rank 0 alone write. Reading it on rank 0 only hangs a multi-process run.
        root = Path(self.dirpath or Path(trainer.log_dir) / "masks")
        if not trainer.is_global_zero:
            return
        root.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"format": PACKED_FORMAT, "masks": pack_masks(masks)}, root / f"{tag}.pt")

    @staticmethod
    def _check_ranks_agree(trainer: L.Trainer, masks: dict[str, Tensor]) -> None:
        """Under data parallelism every rank must hold the same mask; fail loudly if not.

        Two all-reduces (max and min) of a per-rank fingerprint per epoch, on every rank. A divergence
        would mean each rank trains and saves a different network while the run looks healthy.
        """
        if trainer.world_size < 2:
            return
        fingerprint = torch.zeros(2, dtype=torch.float64)
        for i, name in enumerate(sorted(masks)):
            kept = masks[name].flatten().to(torch.float64)
            positions = torch.arange(1, kept.numel() + 1, dtype=torch.float64)
            fingerprint += torch.stack([kept.sum(), (kept * positions).sum() * (i + 1)])
        fingerprint = fingerprint.to(trainer.strategy.root_device)
        highest = trainer.strategy.reduce(fingerprint.clone(), reduce_op=ReduceOp.MAX)
        lowest = -trainer.strategy.reduce(-fingerprint, reduce_op=ReduceOp.MAX)
        if not torch.equal(highest, lowest):
            raise RuntimeError(
                f"the masks differ between ranks at epoch {trainer.current_epoch} (mask fingerprints "
                f"from {lowest.tolist()} to {highest.tolist()}): the ranks no longer train the same network"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.previous = self._masks(pl_module)
        if trainer.current_epoch == 0:
            self._save(trainer, self.previous, "init")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        current = self._masks(pl_module)
        self._check_ranks_agree(trainer, current)
        distance, per_layer = hamming_distance(self.previous, current)
        pl_module.log("mask/hamming", distance, sync_dist=True)
        for name, value in per_layer.items():
            pl_module.log(f"mask/hamming/{name}", value, sync_dist=True)
        self.history.append({"epoch": trainer.current_epoch, "hamming": distance, "per_layer": per_layer})
        self._save(trainer, current, f"epoch_{trainer.current_epoch:03d}")
        self.previous = current

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
