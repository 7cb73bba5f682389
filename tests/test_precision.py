"""bf16-mixed for every stage with attacks in fp32; channels_last."""

import pytest
import torch

import s2ap_lightning.attacks.losses as losses
from s2ap_lightning.attacks import AttackConfig, attack_context, pgd_ce
from s2ap_lightning.models import build_model
from s2ap_lightning.stages import MaskedFinetuner, RobustPretrainer, ScoreSpaceSAMPruner


def test_attack_runs_in_fp32_inside_autocast():
    model = build_model("small_cnn", 4, 3)
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 4, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
        with attack_context(model):
            assert model(x).dtype == torch.float32
            x_adv = pgd_ce(model, x, y, AttackConfig(0.1, 0.03, 2))
    assert x_adv.dtype == torch.float32


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_stage_trains_in_bf16(
    tmp_path, fast_kwargs, synthetic_dm, trainer_factory, monkeypatch, channels_last
):
    dtypes = []
    real_pgd = losses.pgd

    def recording_pgd(model_fn, x, objective, config, start=None):
        dtypes.append(model_fn(x.float()).dtype)
        return real_pgd(model_fn, x, objective, config, start)

    monkeypatch.setattr(losses, "pgd", recording_pgd)
    kw = dict(fast_kwargs, channels_last=channels_last)
    path = None
    for cls, extra in (
        (RobustPretrainer, {}),
        (ScoreSpaceSAMPruner, {"warmup_epochs": 0, "gamma": 0.1}),
        (MaskedFinetuner, {}),
    ):
        module = cls(init_from=path, **extra, **kw)
        trainer = trainer_factory(max_epochs=1, precision="bf16-mixed", limit_val_batches=1)
        trainer.fit(module, datamodule=synthetic_dm)
        assert torch.isfinite(trainer.callback_metrics["train/loss"])
        if channels_last:
            conv = module.model.features[0].weight
            assert conv.is_contiguous(memory_format=torch.channels_last)
        path = str(tmp_path / f"{cls.__name__}.ckpt")
        trainer.save_checkpoint(path)
    assert dtypes and all(d == torch.float32 for d in dtypes), "attacks saw fp32 logits"
