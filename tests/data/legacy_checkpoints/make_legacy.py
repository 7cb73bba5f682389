import lightning as L

from s2ap_lightning.data import RobustDataModule
from s2ap_lightning.stages import MaskedFinetuner, RobustPretrainer, ScoreSpaceSAMPruner

out = "/tmp/legacy"
L.seed_everything(0)
dm = RobustDataModule(
    "synthetic", batch_size=32, synthetic_samples=96, synthetic_image_size=8, synthetic_classes=4
)
common = dict(
    model="small_cnn",
    num_classes=4,
    in_channels=3,
    image_size=8,
    eps=0.1,
    step_size=0.03,
    attack_steps=2,
    eval_pgd_steps=3,
    aa_images=16,
    aa_seed=3,
)


def run(module, name):
    t = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
    )
    t.fit(module, datamodule=dm)
    t.save_checkpoint(f"{out}/{name}.ckpt")


run(RobustPretrainer(**common), "pretrain")
run(
    ScoreSpaceSAMPruner(
        init_from=f"{out}/pretrain.ckpt", sparsity=0.8, gamma=0.01, warmup_epochs=0, **common
    ),
    "s2ap_hydra",
)
run(
    ScoreSpaceSAMPruner(
        init_from=f"{out}/pretrain.ckpt",
        sparsity=0.8,
        gamma=0.01,
        warmup_epochs=0,
        base_method="harp",
        rate_bound=5.0,
        **common,
    ),
    "s2ap_harp",
)
run(MaskedFinetuner(init_from=f"{out}/s2ap_hydra.ckpt", **common), "finetune")
