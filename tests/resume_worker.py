"""Subprocess for test_resume.py: a mask search that can be interrupted mid-epoch and resumed.

Usage: python resume_worker.py OUT_DIR (full | kill K | usr1 K | resume)
- ``kill K``: SIGKILL the whole process group at the start of global step K (``last.ckpt`` is written
  every step); ``resume`` continues from ``last.ckpt``.
- ``usr1 K``: SIGUSR1 to this process at the start of step K, as SLURM's ``--signal`` would send it;
  the stages' SlurmRequeue callback saves ``hpc_ckpt_<N>.ckpt`` at the end of that batch and calls
  ``scontrol requeue`` (the test puts a fake one on PATH that stops the job as SLURM would); ``resume``
  with SLURM variables set then resumes from the hpc checkpoint, as Lightning does in a requeued job.

Environment: RESUME_BASE_METHOD=harp searches with HARP; RESUME_STRATEGY (``auto``, ``ddp``) and
RESUME_DEVICES (1, 2) choose the strategy; RESUME_SLURM=1 runs under Lightning's SLURMEnvironment
(the test sets SLURM_* variables per task, as srun does).
"""

import os
import signal
import sys

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from s2ap_lightning.attacks import ThreatModel
from s2ap_lightning.checkpoint import AtomicCheckpointIO
from s2ap_lightning.data import RobustDataModule
from s2ap_lightning.evaluation import EvalProtocol
from s2ap_lightning.pruning.methods import Harp, Hydra
from s2ap_lightning.stages import ScoreSpaceSAMPruner
from s2ap_lightning.stages.callbacks import checkpoint_callbacks


class InterruptAt(L.Callback):
    def __init__(self, step, how):
        self.step, self.how = step, how

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if self.how == "kill":
            os.killpg(os.getpgid(0), signal.SIGKILL)  # every rank of this run, like a node failure
        elif trainer.is_global_zero:
            os.kill(os.getpid(), signal.SIGUSR1)  # one rank sees it first; the others must follow


def main():
    out, phase = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    slurm = os.environ.get("RESUME_SLURM") == "1"
    devices = int(os.environ.get("RESUME_DEVICES", "1"))
    dm = RobustDataModule("synthetic", batch_size=32, synthetic_samples=256 * devices)
    harp = os.environ.get("RESUME_BASE_METHOD", "hydra") == "harp"
    pruner = ScoreSpaceSAMPruner(
        model="small_cnn",
        num_classes=4,
        in_channels=3,
        threat=ThreatModel(eps=0.1, step_size=0.03, steps=2),
        evaluation=EvalProtocol(pgd_steps=2),
        sparsity=0.8,
        gamma=0.1,
        warmup_epochs=1,
        method=Harp(size_loss_weight=5.0) if harp else Hydra(),
    )
    ckpt_dir = os.path.join(out, "ckpt")
    callbacks = checkpoint_callbacks(ckpt_dir, every_n_train_steps=0 if slurm else 1)
    if phase in ("kill", "usr1"):
        callbacks.append(InterruptAt(int(sys.argv[3]), phase))
    plugins = [AtomicCheckpointIO()]
    if slurm:
        plugins.append(SLURMEnvironment(auto_requeue=True))
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=devices,
        strategy=os.environ.get("RESUME_STRATEGY", "auto"),
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        plugins=plugins,
        limit_val_batches=1,
        default_root_dir=ckpt_dir,
    )
    # Under SLURM a requeued job passes no ckpt_path: Lightning finds hpc_ckpt_<N>.ckpt by itself.
    ckpt_path = "last" if phase == "resume" and not slurm else None
    trainer.fit(pruner, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    if not trainer.is_global_zero:
        return
    masks = {n: m.bool() for n, m in pruner.method.masks().items()}
    torch.save(
        {
            "masks": masks,
            "scores": {n: s.detach() for n, s in pruner.method.items()},
            # The method's own state beyond the scores: HARP's rates and its size-loss schedule.
            "state": {
                k: v
                for k, v in pruner.state_dict().items()
                if k.startswith("method.") and not k.startswith("method.scores.")
            },
            "global_step": trainer.global_step,
        },
        os.path.join(out, f"{phase}.pt"),
    )


if __name__ == "__main__":
    main()
