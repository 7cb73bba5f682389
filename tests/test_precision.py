"""bf16-mixed for every stage with attacks in fp32 (or at the training precision); channels_last."""

import importlib
from pathlib import Path

import pytest
import torch

import s2ap_lightning.attacks.losses as losses
from s2ap_lightning.attacks import ThreatModel, attack_context, pgd_ce
from s2ap_lightning.models import build_model
from s2ap_lightning.stages import MaskedFinetuner, RobustPretrainer, ScoreSpaceSAMPruner


def test_attack_runs_in_fp32_inside_autocast():
    model = build_model("small_cnn", 4, 3)
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 4, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
        with attack_context(model):
            assert model(x).dtype == torch.float32
            x_adv = pgd_ce(model, x, y, ThreatModel(0.1, 0.03, 2))
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


# ----------------------------------------------------------------- attack_precision


@pytest.mark.parametrize("loss_name", ["pgd_at", "trades"])
def test_training_precision_attack_runs_in_bf16_and_still_attacks(loss_name):
    """Under autocast, ``autocast=True`` attacks in bf16; the examples still raise the loss and stay
    in the ball and in [0, 1], and come back in fp32."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 3)
    x, y = torch.rand(64, 3, 8, 8), torch.randint(0, 4, (64,))
    seen = []
    model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    config = ThreatModel(eps=0.1, step_size=0.03, steps=5)
    loss = losses.build_robust_loss(loss_name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = loss.adversarial(model, x, y, config, model, autocast=True)
        low = set(seen)
        seen.clear()
        loss.adversarial(model, x, y, config, model)  # the default: fp32 even inside autocast
    assert low == {torch.bfloat16} and set(seen) == {torch.float32}
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        if loss_name == "pgd_at":
            assert ce(model(x_adv), y) > ce(model(x), y) + 0.01
        else:  # TRADES maximises the KL to the clean prediction, which is 0 at x
            kl = torch.nn.functional.kl_div(
                model(x_adv).log_softmax(1), model(x).softmax(1), reduction="batchmean"
            )
            assert kl > 1e-4


def test_attack_precision_training_reaches_every_stage_but_not_validation(
    tmp_path, fast_kwargs, synthetic_dm, trainer_factory, monkeypatch
):
    # The module, not the function of the same name that s2ap_lightning.attacks re-exports.
    pgd_module = importlib.import_module("s2ap_lightning.attacks.pgd")
    train_dtypes, val_dtypes = [], []
    real_train_pgd, real_pgd = losses.pgd, pgd_module.pgd

    def recording(store, real):
        def wrapped(model_fn, x, objective, config, start=None):
            store.append(model_fn(x.float()).dtype)
            return real(model_fn, x, objective, config, start)

        return wrapped

    monkeypatch.setattr(losses, "pgd", recording(train_dtypes, real_train_pgd))  # training attacks
    monkeypatch.setattr(pgd_module, "pgd", recording(val_dtypes, real_pgd))  # pgd_ce: validation
    path = None
    for cls, extra in (
        (RobustPretrainer, {}),
        (ScoreSpaceSAMPruner, {"warmup_epochs": 0, "gamma": 0.1}),
        (MaskedFinetuner, {"awp_gamma": 0.01}),
    ):
        module = cls(init_from=path, attack_precision="training", **extra, **fast_kwargs)
        trainer = trainer_factory(
            max_epochs=1, precision="bf16-mixed", limit_val_batches=1, limit_train_batches=2
        )
        trainer.fit(module, datamodule=synthetic_dm)
        assert torch.isfinite(trainer.callback_metrics["train/loss"])
        path = str(tmp_path / f"{cls.__name__}.ckpt")
        trainer.save_checkpoint(path)
    assert len(train_dtypes) == 6 and set(train_dtypes) == {torch.bfloat16}
    assert val_dtypes and set(val_dtypes) == {torch.float32}, "validation attacks stay fp32"


def test_attack_precision_is_validated(fast_kwargs):
    with pytest.raises(ValueError, match=r"attack_precision='fp16' is unknown; valid: fp32, training"):
        RobustPretrainer(attack_precision="fp16", **fast_kwargs)


def test_training_clean_accuracy_only_on_logged_steps(tmp_path, fast_kwargs, synthetic_dm, trainer_factory):
    """PGD-AT has no clean logits: the extra clean forward runs on the steps Lightning logs, and the
    logged rows carry the clean accuracy."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    module = RobustPretrainer(**fast_kwargs)
    calls = []
    real = module.net

    def counting_net(weights=None):
        fn = real(weights)

        def call(x):
            calls.append(torch.is_grad_enabled())
            return fn(x)

        return call

    module.net = counting_net
    trainer = trainer_factory(
        max_epochs=1,
        limit_train_batches=6,
        limit_val_batches=0,
        log_every_n_steps=3,
        logger=CSVLogger(tmp_path),
    )
    trainer.fit(module, datamodule=synthetic_dm)
    # Per step: 2 attack-step forwards (attack_steps=2) and the loss's; the clean forward (no grad)
    # on steps 3 and 6 only.
    assert calls.count(False) == 2
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = [r for r in rows if r.get("train/clean_acc")]
    assert [int(r["step"]) for r in logged] == [2, 5]


def test_attacks_stay_fp32_under_cpu_autocast_on_a_machine_with_a_gpu(monkeypatch):
    """A CPU run with bf16-mixed on a GPU machine: CPU autocast is on, and must be turned off too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = build_model("small_cnn", 4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), attack_context(model):
        assert model(torch.rand(2, 3, 8, 8)).dtype == torch.float32


def test_training_precision_attacks_are_refused_under_fp16(fast_kwargs):
    from types import SimpleNamespace

    module = RobustPretrainer(attack_precision="training", **fast_kwargs)
    with pytest.raises(ValueError, match=r"attack_precision='training' with trainer.precision='16-mixed'"):
        module.check_trainer(SimpleNamespace(max_epochs=1, precision="16-mixed"))
    module.check_trainer(SimpleNamespace(max_epochs=1, precision="bf16-mixed"))  # accepted
