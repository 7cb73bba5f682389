"""The mask-search step against hand computations of the method reference."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from s2ap_lightning.pruning import topk_mask
from s2ap_lightning.stages import ScoreSpaceSAMPruner

LR, MOM, WD = 0.1, 0.9, 1e-4


def fixed_batch(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def make_pruner(fast_kwargs, seed=0, **kw):
    torch.manual_seed(seed)
    pruner = ScoreSpaceSAMPruner(lr=LR, momentum=MOM, weight_decay=WD, **{**fast_kwargs, **kw})
    # Deterministic attack (no random start) so hand computations can reproduce it.
    pruner.threat = dataclasses.replace(pruner.threat, random_start=False)
    return pruner


def count_masks(pruner):
    """Count the mask computations of ``pruner`` from now on (the package keeps no counter)."""
    calls = []
    real = pruner.method.masks
    pruner.method.masks = lambda: (calls.append(1), real())[1]
    return calls


def fit(pruner, trainer_factory, batches, epochs=1, **trainer_kw):
    x, y = batches
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x) // trainer_kw.pop("n_batches", 1))
    trainer = trainer_factory(max_epochs=epochs, limit_val_batches=0, **trainer_kw)
    trainer.fit(pruner, train_dataloaders=loader)
    return trainer


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


class HandPruner:
    """The method reference's steps written out with plain autograd, independent of the package."""

    def __init__(self, pruner):
        self.model = copy.deepcopy(pruner.model)
        self.names = list(pruner.method.names)
        self.scores = {n: s.detach().clone().requires_grad_(True) for n, s in pruner.method.items()}
        self.k = pruner.method.kept_counts()
        self.bn = [p for m in bn_layers(self.model) for p in (m.weight, m.bias)]
        self.momentum = {}
        self.attack = pruner.threat

    def weights(self, scores):
        params = dict(self.model.named_parameters())
        out = {}
        for n in self.names:
            m = topk_mask(scores[n], self.k[n])
            a = scores[n].abs()
            out[n] = params[n].detach() * (m + (a - a.detach()))  # exact: the two |s| cancel first
        return out

    def adversarial(self, x, y):
        from s2ap_lightning.attacks import attack_context, pgd

        w = {n: t.detach() for n, t in self.weights(self.scores).items()}
        with attack_context(self.model):
            return pgd(
                lambda inp: functional_call(self.model, w, (inp,), strict=False),
                x,
                lambda z: F.cross_entropy(z, y, reduction="sum"),
                self.attack,
            )

    def loss(self, scores, x_adv, y):
        self.model.train()
        return F.cross_entropy(functional_call(self.model, self.weights(scores), (x_adv,), strict=False), y)

    def sgd(self, params_and_grads):
        with torch.no_grad():
            for key, (p, g) in params_and_grads.items():
                # torch.optim.SGD's arithmetic, written out (same operation order, so bit-exact).
                d = g.add(p, alpha=WD)
                buf = self.momentum.get(key)
                buf = d.clone() if buf is None else buf.mul_(MOM).add_(d)
                self.momentum[key] = buf
                p.add_(buf, alpha=-LR)

    def hydra_step(self, x, y):
        x_adv = self.adversarial(x, y)
        loss = self.loss(self.scores, x_adv, y)
        grads = torch.autograd.grad(loss, [*self.scores.values(), *self.bn])
        self.sgd({i: (p, g) for i, (p, g) in enumerate(zip([*self.scores.values(), *self.bn], grads))})

    def s2ap_step(self, x, y, gamma):
        x_adv = self.adversarial(x, y)
        loss1 = self.loss(self.scores, x_adv, y)  # pass 1 (updates BN running stats)
        stats_after_pass1 = [(m.running_mean.clone(), m.running_var.clone()) for m in bn_layers(self.model)]
        g = dict(zip(self.names, torch.autograd.grad(loss1, list(self.scores.values()))))
        z = {n: gamma * self.scores[n].detach().norm() * g[n] / (g[n].norm() + 1e-12) for n in self.names}
        perturbed = {n: (self.scores[n].detach() + z[n]).requires_grad_(True) for n in self.names}
        for m in bn_layers(self.model):
            m.momentum = 0.0
        loss2 = self.loss(perturbed, x_adv, y)
        for m in bn_layers(self.model):
            m.momentum = 0.1
        grads = torch.autograd.grad(loss2, [*perturbed.values(), *self.bn])
        params = [*self.scores.values(), *self.bn]
        self.sgd({i: (p, gr) for i, (p, gr) in enumerate(zip(params, grads))})
        return stats_after_pass1


def test_one_s2ap_step_equals_hand_computation(fast_kwargs, trainer_factory):
    gamma = 0.5  # large, so that the mask actually changes at s + z
    pruner = make_pruner(fast_kwargs, gamma=gamma, warmup_epochs=0)
    hand = HandPruner(pruner)
    x, y = fixed_batch()
    bn_stats = hand.s2ap_step(x, y, gamma)
    fit(pruner, trainer_factory, (x, y))
    assert pruner.global_step == 1
    for name, s in pruner.method.items():
        torch.testing.assert_close(s.detach(), hand.scores[name].detach(), rtol=1e-5, atol=1e-7)
    for m_pruner, m_hand in zip(bn_layers(pruner.model), bn_layers(hand.model)):
        torch.testing.assert_close(m_pruner.weight, m_hand.weight, rtol=1e-5, atol=1e-7)
    # BatchNorm running statistics: those of pass 1 alone.
    for m, (mean, var) in zip(bn_layers(pruner.model), bn_stats):
        torch.testing.assert_close(m.running_mean, mean)
        torch.testing.assert_close(m.running_var, var)
        assert int(m.num_batches_tracked) == 1


def test_perturbation_changes_mask_at_this_gamma(fast_kwargs):
    from s2ap_lightning.pruning import score_perturbation

    pruner = make_pruner(fast_kwargs, gamma=0.5)
    scores = dict(pruner.method.items())
    g = {n: torch.randn_like(s) for n, s in scores.items()}
    z = score_perturbation(scores, g, 0.5)
    for n, s in scores.items():
        assert torch.allclose(z[n].norm(), 0.5 * s.detach().norm(), rtol=1e-5)
    k = pruner.method.kept_counts()
    assert any(not torch.equal(topk_mask(s, k[n]), topk_mask(s + z[n], k[n])) for n, s in scores.items())


def test_gamma_zero_equals_hydra_bit_for_bit(fast_kwargs, trainer_factory):
    batches = fixed_batch(64)
    hand = HandPruner(make_pruner(fast_kwargs, gamma=0.0))
    pruner = make_pruner(fast_kwargs, gamma=0.0, warmup_epochs=0)
    fit(pruner, trainer_factory, batches, epochs=1, n_batches=4, max_steps=4)
    x, y = batches
    for i in range(4):
        hand.hydra_step(x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)])
    assert pruner.global_step == 4
    for name, s in pruner.method.items():
        assert torch.equal(s.detach(), hand.scores[name].detach()), name


def test_hydra_baseline_is_gamma_zero_and_the_removed_class_says_so(fast_kwargs, trainer_factory):
    # The HYDRA baseline is the search with the perturbation off; the removed HydraPruner (which only
    # forced gamma to 0) fails naming that replacement instead of an opaque ImportError.
    import s2ap_lightning.stages as stages

    with pytest.raises(AttributeError, match=r"HydraPruner was removed.*ScoreSpaceSAMPruner with gamma=0"):
        stages.HydraPruner  # noqa: B018
    # gamma = 0 is the base method whatever the warm-up: no S2AP step ever runs.
    a = make_pruner(fast_kwargs, gamma=0.0, warmup_epochs=0)
    b = make_pruner(fast_kwargs, gamma=0.0, warmup_epochs=1)
    assert a.hparams.gamma == 0.0
    fit(a, trainer_factory, fixed_batch(), epochs=2)
    fit(b, trainer_factory, fixed_batch(), epochs=2)
    for (n, sa), (_, sb) in zip(a.method.items(), b.method.items()):
        assert torch.equal(sa, sb), n


def test_warmup_epochs_take_plain_steps(fast_kwargs, trainer_factory):
    batches = fixed_batch()
    s2ap = make_pruner(fast_kwargs, gamma=0.5, warmup_epochs=2)
    hydra = make_pruner(fast_kwargs, gamma=0.0)
    fit(s2ap, trainer_factory, batches, epochs=3, max_steps=2)  # one batch per epoch: 2 epochs
    fit(hydra, trainer_factory, batches, epochs=3, max_steps=2)
    for (n, a), (_, b) in zip(s2ap.method.items(), hydra.method.items()):
        assert torch.equal(a, b), n
    # ... and the third epoch (S2AP active) departs from HYDRA.
    s2ap_more = make_pruner(fast_kwargs, gamma=0.5, warmup_epochs=2)
    hydra_more = make_pruner(fast_kwargs, gamma=0.0)
    fit(s2ap_more, trainer_factory, batches, epochs=3)
    fit(hydra_more, trainer_factory, batches, epochs=3)
    assert any(
        not torch.equal(a, b) for (_, a), (_, b) in zip(s2ap_more.method.items(), hydra_more.method.items())
    )


@pytest.mark.parametrize("attack_steps", [1, 5])
@pytest.mark.parametrize("gamma,reuse,expected", [(0.0, True, 1), (0.1, True, 2), (0.1, False, 2)])
def test_mask_computed_once_per_forward_pass_not_per_attack_step(
    fast_kwargs, trainer_factory, attack_steps, gamma, reuse, expected
):
    threat = dataclasses.replace(fast_kwargs["threat"], steps=attack_steps)
    pruner = make_pruner(
        {**fast_kwargs, "threat": threat}, gamma=gamma, warmup_epochs=0, reuse_adversarial=reuse
    )
    calls = count_masks(pruner)
    fit(pruner, trainer_factory, fixed_batch(64), epochs=1, n_batches=2)
    # One per step for the mask, +1 per epoch for the logged density, +1 per epoch and +1 at fit start
    # for the stability tracker.
    assert len(calls) == 2 * expected + 3


def test_one_optimizer_step_per_batch_and_scheduler_steps(fast_kwargs, trainer_factory):
    pruner = make_pruner(fast_kwargs, gamma=0.1, warmup_epochs=0)
    trainer = fit(pruner, trainer_factory, fixed_batch(64), epochs=3, n_batches=4)
    assert trainer.global_step == 12
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr < LR, "cosine schedule stepped"
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 3


def test_weights_are_frozen_and_bn_affine_trains(fast_kwargs, trainer_factory):
    pruner = make_pruner(fast_kwargs, gamma=0.1, warmup_epochs=0)
    before = copy.deepcopy(pruner.model.state_dict())
    fit(pruner, trainer_factory, fixed_batch(), epochs=1)
    after = pruner.model.state_dict()
    for name in pruner.method.names:
        assert torch.equal(before[name], after[name]), "weights frozen"
    assert not torch.equal(before["features.1.weight"], after["features.1.weight"]), "BN affine trains"


def test_freeze_bn_keeps_bn_fixed(fast_kwargs, trainer_factory):
    pruner = make_pruner(fast_kwargs, gamma=0.1, warmup_epochs=0, freeze_bn=True)
    before = copy.deepcopy(pruner.model.state_dict())
    fit(pruner, trainer_factory, fixed_batch(), epochs=1)
    after = pruner.model.state_dict()
    for key in ("features.1.weight", "features.1.running_mean"):
        assert torch.equal(before[key], after[key]), key


def test_regenerated_adversarials_differ_from_reused(fast_kwargs, trainer_factory):
    a = make_pruner(fast_kwargs, gamma=0.5, warmup_epochs=0, reuse_adversarial=True)
    b = make_pruner(fast_kwargs, gamma=0.5, warmup_epochs=0, reuse_adversarial=False)
    fit(a, trainer_factory, fixed_batch(), epochs=1)
    fit(b, trainer_factory, fixed_batch(), epochs=1)
    assert any(not torch.equal(sa, sb) for (_, sa), (_, sb) in zip(a.method.items(), b.method.items()))


def test_warmup_longer_than_search_fails_before_training(fast_kwargs, trainer_factory):
    pruner = make_pruner(fast_kwargs, gamma=0.1, warmup_epochs=5)
    calls = count_masks(pruner)
    with pytest.raises(ValueError, match=r"warmup_epochs=5.*max_epochs=3"):
        fit(pruner, trainer_factory, fixed_batch(), epochs=3)
    assert not calls


def test_restoring_under_another_sparsity_is_refused(fast_kwargs, trainer_factory, tmp_path):
    pruner = make_pruner(fast_kwargs, gamma=0.0, sparsity=0.8)
    trainer = fit(pruner, trainer_factory, fixed_batch(), epochs=1)
    trainer.save_checkpoint(tmp_path / "p.ckpt")
    other = make_pruner(fast_kwargs, gamma=0.0, sparsity=0.5)
    with pytest.raises(ValueError, match=r"sparsity=0.5 does not match the checkpoint's sparsity=0.8"):
        trainer_factory(limit_test_batches=1).test(
            other,
            dataloaders=DataLoader(TensorDataset(*fixed_batch())),
            ckpt_path=str(tmp_path / "p.ckpt"),
            weights_only=True,
        )


def test_same_seed_same_masks_and_metrics(fast_kwargs, synthetic_dm, trainer_factory):
    """Two S2AP mask searches with the same seed on CPU: identical scores, masks and logged metrics."""
    import lightning as L

    runs = []
    for _ in range(2):
        L.seed_everything(7, verbose=False)
        pruner = ScoreSpaceSAMPruner(sparsity=0.8, gamma=0.05, warmup_epochs=1, **fast_kwargs)
        trainer = trainer_factory(max_epochs=2, deterministic=True)
        trainer.fit(pruner, datamodule=synthetic_dm)
        synthetic_dm.train_set = None  # a fresh setup, as a second command would do
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        runs.append(
            ({n: m.clone() for n, m in pruner.method.masks().items()}, dict(pruner.method.items()), metrics)
        )
    (masks_a, scores_a, metrics_a), (masks_b, scores_b, metrics_b) = runs
    assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)
    assert all(torch.equal(scores_a[n], scores_b[n]) for n in scores_a)
    assert metrics_a == metrics_b and "val/robust_acc" in metrics_a
