"""HARP as a second base method, and the global pruning scope."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from s2ap_lightning.attacks import AttackConfig, attack_context, pgd
from s2ap_lightning.models import build_model
from s2ap_lightning.pruning.scores import HarpScoreSet, ScoreSet, masked_forward
from s2ap_lightning.stages import ScoreSpaceSAMPruner


@pytest.mark.parametrize("rate_grad", ["sum", "mean"])
def test_harp_rate_gradient_is_sum_of_score_gradients(rate_grad):
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 3)
    harp = HarpScoreSet(model, 0.8, rate_grad=rate_grad)
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 4, (8,))
    masks = harp.masks()
    F.cross_entropy(masked_forward(model, harp.effective_weights(model, masks), x), y).backward()
    for name, score in harp.items():
        rate = harp.rates[name.replace(".", "__")]
        expected = score.grad.sum() if rate_grad == "sum" else score.grad.mean()
        torch.testing.assert_close(rate.grad, expected, rtol=1e-5, atol=1e-9)

    # Values are untouched by the rate term: still exactly w * M.
    params = dict(model.named_parameters())
    for name, w in harp.effective_weights(model, masks).items():
        assert torch.equal(w.detach(), params[name].detach() * masks[name])


def test_harp_keep_rates_start_at_target_and_respect_minimum():
    harp = HarpScoreSet(build_model("small_cnn", 4, 3), 0.9)
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


def harp_pruner(fast_kwargs, **kw):
    torch.manual_seed(0)
    p = ScoreSpaceSAMPruner(
        base_method="harp", sparsity=0.8, lr=0.1, momentum=0.9, weight_decay=5e-4, **{**fast_kwargs, **kw}
    )
    p.train_attack = AttackConfig(
        p.hparams.eps, p.hparams.step_size, p.hparams.attack_steps, random_start=False
    )
    return p


def test_harp_gamma_zero_equals_hand_written_harp(fast_kwargs, trainer_factory):
    pruner = harp_pruner(fast_kwargs, gamma=0.0)
    model, harp = copy.deepcopy(pruner.model), copy.deepcopy(pruner.scores)
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
                pruner.train_attack,
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
    trainer = trainer_factory(max_epochs=1, limit_val_batches=0)
    trainer.fit(pruner, train_dataloaders=loader)
    for (name, s), (_, h) in zip(pruner.scores.items(), harp.items()):
        assert torch.equal(s, h), name
    for key in harp.rates:
        assert torch.equal(pruner.scores.rates[key], harp.rates[key]), key


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
    assert seen and all(keys == set(pruner.scores.names) for keys in seen)


def test_harp_meets_density_target(fast_kwargs, synthetic_dm, trainer_factory):
    pruner = harp_pruner(fast_kwargs, gamma=0.05, warmup_epochs=1, size_loss_weight=2.0)
    trainer_factory(max_epochs=6, limit_val_batches=1).fit(pruner, datamodule=synthetic_dm)
    density = pruner.scores.density(pruner.scores.masks())
    # The size loss is a hinge on the density budget: the search must not keep more than the target
    # (+0.5 points); it may compress further when the robust loss lets the rates fall.
    assert density <= 0.2 + 0.005, density

    counts = pruner.scores.kept_counts()
    assert (
        len(set(round(c / s.numel(), 3) for (n, s), c in zip(pruner.scores.items(), counts.values()))) > 1
    ), "HARP learns different rates per layer"


def test_global_scope_one_threshold_with_layer_minimum():
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 3)
    scores = ScoreSet(model, 0.9, scope="global", min_layer_keep=0.02)
    masks = scores.masks()
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * total)
    for name, m in masks.items():
        assert int(m.sum()) >= max(1, round(0.02 * m.numel())), name
    assert len({round(float(m.mean()), 3) for m in masks.values()}) > 1, "layers keep different fractions"
    with pytest.raises(ValueError, match="min_layer_keep=0.5 is out of range"):
        ScoreSet(model, 0.9, scope="global", min_layer_keep=0.5)


def test_harp_size_weight_grows_until_target_then_freezes(fast_kwargs, synthetic_dm, trainer_factory):
    pruner = harp_pruner(fast_kwargs, gamma=0.0, size_loss_weight=0.5)
    with torch.no_grad():  # start well above the density target
        for r in pruner.scores.rates.values():
            r.fill_(3.0)
    trainer_factory(max_epochs=1, limit_val_batches=0, limit_train_batches=1).fit(
        pruner, datamodule=synthetic_dm
    )
    assert float(pruner.size_weight) == pytest.approx(1.0) and not bool(pruner.size_weight_frozen)
    with torch.no_grad():
        for r in pruner.scores.rates.values():
            r.fill_(-5.0)
    trainer_factory(max_epochs=1, limit_val_batches=0, limit_train_batches=1).fit(
        pruner, datamodule=synthetic_dm
    )
    assert bool(pruner.size_weight_frozen)
    frozen = float(pruner.size_weight)
    trainer_factory(max_epochs=1, limit_val_batches=0, limit_train_batches=1).fit(
        pruner, datamodule=synthetic_dm
    )
    assert float(pruner.size_weight) == frozen
