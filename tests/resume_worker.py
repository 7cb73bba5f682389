"""Subprocess for test_resume.py: a mask search that can be SIGKILLed mid-epoch and resumed.

Usage: python resume_worker.py OUT_DIR (full | kill K | resume); RESUME_BASE_METHOD=harp searches with
HARP (learnt rates, size-loss schedule) instead of HYDRA.
"""

import os
import signal
import sys

import lightning as L
import torch

from s2ap_lightning.checkpoint import AtomicCheckpointIO
from s2ap_lightning.data import RobustDataModule
from s2ap_lightning.stages import ScoreSpaceSAMPruner
from s2ap_lightning.stages.callbacks import checkpoint_callbacks


class KillAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    out, phase = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    dm = RobustDataModule("synthetic", batch_size=32, synthetic_samples=256)
    pruner = ScoreSpaceSAMPruner(
        model="small_cnn",
        num_classes=4,
        in_channels=3,
        eps=0.1,
        step_size=0.03,
        attack_steps=2,
        eval_pgd_steps=2,
        sparsity=0.8,
        gamma=0.1,
        warmup_epochs=1,
        base_method=os.environ.get("RESUME_BASE_METHOD", "hydra"),
        size_loss_weight=5.0,
    )
    callbacks = checkpoint_callbacks(os.path.join(out, "ckpt"), every_n_train_steps=1)
    if phase == "kill":
        callbacks.append(KillAt(int(sys.argv[3])))
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        limit_val_batches=1,
    )
    trainer.fit(pruner, datamodule=dm, ckpt_path="last" if phase == "resume" else None, weights_only=True)
    masks = {n: m.bool() for n, m in pruner.scores.masks().items()}
    torch.save(
        {
            "masks": masks,
            "scores": {n: s.detach() for n, s in pruner.scores.items()},
            "state": {
                k: v
                for k, v in pruner.state_dict().items()
                if k.startswith(("size_", "budget_", "scores.rates"))
            },
            "global_step": trainer.global_step,
        },
        os.path.join(out, f"{phase}.pt"),
    )


if __name__ == "__main__":
    main()
