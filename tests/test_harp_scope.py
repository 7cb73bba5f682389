"""HARP as a second base method, and the global pruning scope."""

import copy
import dataclasses

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from s2ap_lightning.attacks import ThreatModel, attack_context, pgd
from s2ap_lightning.data import RobustDataModule
from s2ap_lightning.evaluation import EvalProtocol
from s2ap_lightning.models import build_model
from s2ap_lightning.pruning.methods import Harp, Hydra
from s2ap_lightning.pruning.scores import masked_forward
from s2ap_lightning.stages import RobustPretrainer, ScoreSpaceSAMPruner
from s2ap_lightning.stages.callbacks import checkpoint_callbacks


@pytest.mark.parametrize("rate_grad", ["logit", "keep"])
def test_harp_rate_gradient_is_sum_of_mask_gradients(rate_grad):
    """The straight-through estimator hands the rate the sum of ``dL/dM = w * dL/dw_eff``: as the
    logit's own gradient (``logit``), or as the keep fraction's, which autograd carries on to the
    logit through ``k = k_min + (1 - k_min) * sigmoid(r)`` (``keep``, HARP's code)."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 3)
    harp = Harp(rate_grad=rate_grad).build(model, 0.8)
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 4, (8,))
    masks = harp.masks()
    weights = harp.effective_weights(model, masks)
    for w in weights.values():
        w.retain_grad()
    F.cross_entropy(masked_forward(model, weights, x), y).backward()
    params = dict(model.named_parameters())
    for name, score in harp.items():
        rate = harp.rates[name.replace(".", "__")]
        sig = torch.sigmoid(rate.detach())
        dk_dr = (1 - harp.k_min) * sig * (1 - sig) if rate_grad == "keep" else 1.0
        by_hand = (params[name].detach() * weights[name].grad).sum() * dk_dr
        torch.testing.assert_close(rate.grad, by_hand, rtol=1e-5, atol=1e-9)
        # The same sum read from the scores: their gradient without the sign of |s|.
        from_scores = (score.grad * score.detach().sign()).sum() * dk_dr
        torch.testing.assert_close(rate.grad, from_scores, rtol=1e-5, atol=1e-9)
        assert not torch.allclose(rate.grad, score.grad.sum() * dk_dr), "a sign(s)-weighted sum differs"

    # Values are untouched by the rate term: still exactly w * M.
    for name, w in harp.effective_weights(model, masks).items():
        assert torch.equal(w.detach(), params[name].detach() * masks[name])


def test_harp_rates_are_clamped_only_when_bounded():
    model = build_model("small_cnn", 4, 3)
    for bound, expected in ((6.0, 6.0), (None, 50.0)):
        harp = Harp(rate_bound=bound).build(model, 0.9)
        with torch.no_grad():
            for r in harp.rates.values():
                r.fill_(50.0)
        harp.clamp_rates_()
        assert all(float(r) == expected for r in harp.rates.values())
    with pytest.raises(ValueError, match="rate_bound=0.0 is out of range"):
        Harp(rate_bound=0.0)
    with pytest.raises(ValueError, match="rate_grad='mean' is unknown; valid: logit, keep"):
        Harp(rate_grad="mean")


def test_harp_keep_rates_start_at_target_and_respect_minimum():
    harp = Harp().build(build_model("small_cnn", 4, 3), 0.9)
    assert float(harp.expected_density()) == pytest.approx(0.1, rel=1e-5)
    with torch.no_grad():
        for r in harp.rates.values():
            r.fill_(-50.0)
    assert float(harp.expected_density()) == pytest.approx(0.01, rel=1e-3), "k_min = 0.1 * target"
    assert float(harp.size_loss()) == 0.0


def fixed_loader(n=64, batch=16):
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)),
        batch_size=batch,
    )


def harp_pruner(fast_kwargs, size_loss_weight=1.0, **kw):
    torch.manual_seed(0)
    p = ScoreSpaceSAMPruner(
        method=Harp(size_loss_weight=size_loss_weight),
        sparsity=0.8,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        **{**fast_kwargs, **kw},
    )
    p.threat = dataclasses.replace(p.threat, random_start=False)
    return p


def test_harp_gamma_zero_equals_hand_written_harp(fast_kwargs, trainer_factory):
    pruner = harp_pruner(fast_kwargs, gamma=0.0)
    model, harp = copy.deepcopy(pruner.model), copy.deepcopy(pruner.method)
    bn = [p for n, p in model.named_parameters() if p.requires_grad]
    params = [*[s for _, s in harp.items()], *harp.rates.values(), *bn]
    momentum = {}
    loader = fixed_loader()
    for x, y in loader:
        masks = harp.masks()
        frozen = {n: w.detach() for n, w in harp.effective_weights(model, masks, False).items()}
        with attack_context(model):
            x_adv = pgd(
                lambda i: functional_call(model, frozen, (i,), strict=False),
                x,
                lambda z: F.cross_entropy(z, y, reduction="sum"),
                pruner.threat,
            )
        model.train()
        logits = functional_call(model, harp.effective_weights(model, masks), (x_adv,), strict=False)
        loss = F.cross_entropy(logits, y) + 1.0 * harp.size_loss()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                d = g.add(p, alpha=5e-4)
                buf = momentum[i] = d.clone() if i not in momentum else momentum[i].mul_(0.9).add_(d)
                p.add_(buf, alpha=-0.1)
            for r in harp.rates.values():  # rate_bound 6 (the default)
                r.clamp_(-6.0, 6.0)
    trainer = trainer_factory(max_epochs=1, limit_val_batches=0)
    trainer.fit(pruner, train_dataloaders=loader)
    for (name, s), (_, h) in zip(pruner.method.items(), harp.items()):
        assert torch.equal(s, h), name
    for key in harp.rates:
        assert torch.equal(pruner.method.rates[key], harp.rates[key]), key


def test_s2ap_on_harp_perturbs_scores_only(fast_kwargs, trainer_factory, monkeypatch):
    import s2ap_lightning.stages.prune as prune_mod

    seen = []
    real = prune_mod.score_perturbation

    def spy(scores, grads, gamma):
        seen.append(set(scores))
        return real(scores, grads, gamma)

    monkeypatch.setattr(prune_mod, "score_perturbation", spy)
    pruner = harp_pruner(fast_kwargs, gamma=0.1, warmup_epochs=0)
    trainer_factory(max_epochs=1, limit_val_batches=0).fit(pruner, train_dataloaders=fixed_loader())
    assert seen and all(keys == set(pruner.method.names) for keys in seen)


def test_harp_size_weight_grows_linearly_then_freezes():
    # The method object alone: no LightningModule, no Trainer.
    harp = Harp(size_loss_weight=0.5).build(build_model("small_cnn", 4, 3), 0.8)  # target density 0.2
    seen = []
    for epoch, density in enumerate([0.19, 0.35, 0.25, 0.20, 0.30, 0.10]):
        logged = harp.end_of_epoch(density, epoch)
        seen.append((float(harp.size_weight), bool(harp.size_weight_frozen)))
        assert logged == {"prune/size_weight": seen[-1][0]}
    assert seen == [
        (1.0, False),  # under the target from the start: not "met" yet, the weight keeps growing
        (1.5, False),
        (2.0, False),
        (2.0, True),  # back at the target after exceeding it: frozen at the weight that got it there
        (2.0, True),
        (2.0, True),
    ]


@pytest.fixture(scope="module")
def pretrained_digits(tmp_path_factory):
    """A briefly adversarially trained small CNN on the bundled digits (about 5 s)."""
    L.seed_everything(0, verbose=False)
    kw = dict(threat=ThreatModel(eps=0.1, step_size=0.025, steps=5), evaluation=EvalProtocol(pgd_steps=5))
    trainer = quiet_trainer(max_epochs=6, limit_val_batches=1)
    trainer.fit(RobustPretrainer(**kw), datamodule=RobustDataModule("digits"))
    path = tmp_path_factory.mktemp("digits") / "pretrained.ckpt"
    trainer.save_checkpoint(path)
    return str(path), kw


# At 0.95 the default weight (1.0, HARP's code) needs about 20 epochs on this model; 3.0 needs 6.
# The second setting (a stronger size loss, higher sparsity) runs with `pytest -m slow` (14 s).
@pytest.mark.parametrize(
    ("sparsity", "weight", "epochs"), [(0.9, 1.0, 10), pytest.param(0.95, 3.0, 12, marks=pytest.mark.slow)]
)
def test_harp_final_density_meets_target(pretrained_digits, tmp_path, sparsity, weight, epochs):
    """Two-sided: the searched mask keeps the target density within 0.5 points, and the best
    checkpoint is the best validation robust accuracy among the epochs inside the budget."""

    class Record(L.Callback):
        def __init__(self):
            self.rows = []

        def on_validation_end(self, trainer, module):
            if not trainer.sanity_checking:
                density = module.method.density(module.method.masks())
                self.rows.append(
                    (module.current_epoch, density, float(trainer.callback_metrics["val/robust_acc"]))
                )

    path, kw = pretrained_digits
    L.seed_everything(0, verbose=False)
    pruner = ScoreSpaceSAMPruner(
        method=Harp(size_loss_weight=weight),
        sparsity=sparsity,
        gamma=0.01,
        warmup_epochs=2,
        weight_decay=5e-4,
        init_from=path,
        **kw,
    )
    record = Record()
    trainer = quiet_trainer(
        max_epochs=epochs,
        limit_val_batches=1,
        enable_checkpointing=True,
        callbacks=[*checkpoint_callbacks(str(tmp_path)), record],
    )
    trainer.fit(pruner, datamodule=RobustDataModule("digits"))
    target = 1.0 - sparsity

    assert abs(pruner.method.density(pruner.method.masks()) - target) <= 0.005
    assert bool(pruner.method.size_weight_frozen), "the size-loss weight froze once the target was met"
    counts = pruner.method.kept_counts()
    assert len({round(c / s.numel(), 3) for (_, s), c in zip(pruner.method.items(), counts.values())}) > 1, (
        "HARP learns different rates per layer"
    )

    best = torch.load(tmp_path / "best.ckpt", weights_only=True)
    kept = sum(int(m.sum()) for m in best["masks"].values())
    best_density = kept / sum(m.numel() for m in best["masks"].values())
    rounding = 0.5 * 4 / sum(m.numel() for m in best["masks"].values())  # half a weight per layer
    assert target - 0.005 <= best_density <= target + rounding, best_density
    eligible = [r for r in record.rows if target - 0.005 - 1e-9 <= r[1] <= target + rounding]

    assert len(eligible) < len(record.rows), "some epochs were over budget and had to be skipped"
    best_acc = max(r[2] for r in eligible)
    assert best["epoch"] == next(r[0] for r in eligible if r[2] == best_acc)


def test_global_scope_one_threshold_with_layer_minimum():
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 3)
    scores = Hydra(scope="global", min_layer_keep=0.02).build(model, 0.9)
    masks = scores.masks()
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * total)
    for name, m in masks.items():
        assert int(m.sum()) >= max(1, round(0.02 * m.numel())), name
    assert len({round(float(m.mean()), 3) for m in masks.values()}) > 1, "layers keep different fractions"
    with pytest.raises(ValueError, match="min_layer_keep=0.5 is out of range"):
        Hydra(scope="global", min_layer_keep=0.5).build(model, 0.9)


def test_harp_size_weight_grows_until_target_then_freezes(fast_kwargs, synthetic_dm, trainer_factory):
    pruner = harp_pruner(fast_kwargs, gamma=0.0, size_loss_weight=0.5)
    with torch.no_grad():  # start well above the density target
        for r in pruner.method.rates.values():
            r.fill_(3.0)
    trainer_factory(max_epochs=1, limit_val_batches=0, limit_train_batches=1).fit(
        pruner, datamodule=synthetic_dm
    )
    assert float(pruner.method.size_weight) == pytest.approx(1.0) and not bool(
        pruner.method.size_weight_frozen
    )
    with torch.no_grad():
        for r in pruner.method.rates.values():
            r.fill_(-5.0)
    trainer_factory(max_epochs=1, limit_val_batches=0, limit_train_batches=1).fit(
        pruner, datamodule=synthetic_dm
    )
    assert bool(pruner.method.size_weight_frozen)
    frozen = float(pruner.method.size_weight)
    trainer_factory(max_epochs=1, limit_val_batches=0, limit_train_batches=1).fit(
        pruner, datamodule=synthetic_dm
    )
    assert float(pruner.method.size_weight) == frozen


def test_harp_budget_band_and_warning_without_a_trainer():
    harp = Harp(density_tolerance=0.01).build(build_model("small_cnn", 4, 3), 0.9)
    assert harp.in_band(0.1) and harp.in_band(0.095) and not harp.in_band(0.085) and not harp.in_band(0.12)
    assert harp.within_budget(), "the rates start at the target"
    assert "never ended an epoch in [0.09, 0.1]" in harp.end_of_search_warning()
    harp.end_of_epoch(0.1, 0)
    assert harp.end_of_search_warning() is None and float(harp.extra_loss()) == pytest.approx(0.0, abs=1e-5)
    hydra = Hydra().build(build_model("small_cnn", 4, 3), 0.9)
    assert hydra.extra_loss() is None and hydra.within_budget() and hydra.end_of_epoch(0.1, 0) == {}


def test_checkpoints_with_the_schedule_on_the_stage_still_load(fast_kwargs, tmp_path):
    """Before the methods owned their state, HARP's buffers sat on the stage (HYDRA's too), the
    scores under ``scores.`` and the method in flat hyper-parameters (``base_method``)."""
    import lightning

    for name, method in (("hydra", Hydra()), ("harp", Harp())):
        pruner = ScoreSpaceSAMPruner(method=method, sparsity=0.8, **fast_kwargs)
        state = pruner.state_dict()
        schedule = ("size_weight", "size_weight_frozen", "size_above_target", "budget_met")
        legacy = {
            ("scores." + k.removeprefix("method.") if k.startswith("method.") else k): v
            for k, v in state.items()
            if k.removeprefix("method.") not in schedule
        }
        legacy.update({k: torch.tensor(2.5 if k == "size_weight" else False) for k in schedule})
        hparams = {k: v for k, v in pruner.hparams.items() if k != "method"}
        hparams["base_method"] = name
        path = tmp_path / f"{name}.ckpt"
        torch.save(
            {
                "state_dict": legacy,
                "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__,
            },
            path,
        )
        loaded = ScoreSpaceSAMPruner.load_from_checkpoint(path, weights_only=True)
        assert loaded.method_spec == method
        # The scores themselves come through unchanged for both methods ...
        for layer, score in pruner.method.items():
            assert torch.equal(loaded.method[layer], score), layer
        # ... and HARP's schedule lands on the method (HYDRA has none to take).
        if name == "harp":
            assert float(loaded.method.size_weight) == 2.5
        else:
            assert not any("size_weight" in k for k in loaded.state_dict())
