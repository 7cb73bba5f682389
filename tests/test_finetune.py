import pytest
import torch

from s2ap_lightning.checkpoint import CheckpointError
from s2ap_lightning.models import build_model
from s2ap_lightning.pruning import Hydra
from s2ap_lightning.stages import MaskedFinetuner, RobustPretrainer


@pytest.fixture
def pruned_state_dict_file(tmp_path, fast_kwargs):
    torch.manual_seed(0)
    model = build_model("small_cnn", fast_kwargs["num_classes"], fast_kwargs["in_channels"])
    masks = Hydra().build(model, 0.8).masks()
    state = model.state_dict()
    for n, m in masks.items():
        state[n] = state[n] * m
    path = tmp_path / "pruned.pt"
    torch.save(state, path)
    return path, masks


def test_pruned_weights_stay_exactly_zero(pruned_state_dict_file, fast_kwargs, synthetic_dm, trainer_factory):
    path, masks = pruned_state_dict_file
    ft = MaskedFinetuner(init_from=str(path), lr=0.05, weight_decay=5e-4, **fast_kwargs)
    before = {n: p.detach().clone() for n, p in ft.model.named_parameters()}
    trainer = trainer_factory(max_epochs=2, limit_val_batches=0)
    trainer.fit(ft, datamodule=synthetic_dm)
    assert trainer.global_step > 5
    params = dict(ft.model.named_parameters())
    for name, mask in masks.items():
        w = params[name].detach()
        assert (w[mask == 0] == 0).all(), name
        assert torch.equal(ft.masks[name], mask)
        assert not torch.equal(w[mask == 1], before[name][mask == 1]), "kept weights train"


def test_finetuner_takes_masks_from_a_prune_checkpoint(tmp_path, fast_kwargs, synthetic_dm, trainer_factory):
    from s2ap_lightning.stages import ScoreSpaceSAMPruner

    pruner = ScoreSpaceSAMPruner(sparsity=0.9, gamma=0.0, **fast_kwargs)
    trainer = trainer_factory(max_epochs=1, limit_val_batches=0)
    trainer.fit(pruner, datamodule=synthetic_dm)
    ckpt = tmp_path / "prune.ckpt"
    trainer.save_checkpoint(ckpt)
    expected = pruner.method.masks()
    ft = MaskedFinetuner(init_from=str(ckpt), **fast_kwargs)
    ft.setup("fit")
    params = dict(ft.model.named_parameters())
    for name, mask in expected.items():
        assert torch.equal(ft.masks[name], mask)
        assert (params[name][mask == 0] == 0).all()


def test_init_from_wrong_architecture_names_keys(tmp_path, fast_kwargs):
    torch.save(build_model("resnet18", 4, 3).state_dict(), tmp_path / "r18.pt")
    ft = RobustPretrainer(init_from=str(tmp_path / "r18.pt"), **fast_kwargs)
    with pytest.raises(CheckpointError, match=r"missing keys \[classifier.bias.*unexpected keys \[bn1"):
        ft.setup("fit")


def test_init_from_missing_file(fast_kwargs):
    ft = RobustPretrainer(init_from="does/not/exist.ckpt", **fast_kwargs)
    with pytest.raises(CheckpointError, match="does/not/exist.ckpt"):
        ft.setup("fit")


def test_pretrainer_learns_synthetic_data(fast_kwargs, synthetic_dm, trainer_factory):
    torch.manual_seed(0)
    model = RobustPretrainer(lr=0.05, **fast_kwargs)
    trainer = trainer_factory(max_epochs=4)
    trainer.fit(model, datamodule=synthetic_dm)
    assert trainer.callback_metrics["val/clean_acc"] > 0.8
    assert trainer.callback_metrics["val/robust_acc"] <= trainer.callback_metrics["val/clean_acc"]


def test_awp_step_equals_hand_computation(pruned_state_dict_file, fast_kwargs, trainer_factory):
    import copy
    import dataclasses

    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from s2ap_lightning.attacks import attack_context, pgd

    path, masks = pruned_state_dict_file
    gamma, lr = 0.05, 0.1
    ft = MaskedFinetuner(
        init_from=str(path), lr=lr, momentum=0.0, weight_decay=0.0, awp_gamma=gamma, **fast_kwargs
    )
    ft.setup("fit")
    ft.threat = dataclasses.replace(ft.threat, random_start=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    hand = copy.deepcopy(ft.model)
    with attack_context(hand):
        x_adv = pgd(hand, x, lambda z: F.cross_entropy(z, y, reduction="sum"), ft.threat)
    hand.train()
    weights = {n: p for n, p in hand.named_parameters() if p.dim() > 1}
    momenta = [m.momentum for m in hand.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in hand.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0
    grads = torch.autograd.grad(F.cross_entropy(hand(x_adv), y), list(weights.values()))
    for m, mom in zip([m for m in hand.modules() if isinstance(m, torch.nn.BatchNorm2d)], momenta):
        m.momentum = mom
    v = {}
    with torch.no_grad():
        for (n, w), gr in zip(weights.items(), grads):
            v[n] = gamma * w.norm() * gr / (gr.norm() + 1e-12) * masks.get(n, torch.ones_like(w))
            w.add_(v[n])
    loss = F.cross_entropy(hand(x_adv), y)
    params = [p for p in hand.parameters() if p.requires_grad]
    grads2 = torch.autograd.grad(loss, params)
    with torch.no_grad():
        named = dict(hand.named_parameters())
        for n, vv in v.items():
            named[n].sub_(vv)
        for (n, p), gr in zip([(n, p) for n, p in hand.named_parameters() if p.requires_grad], grads2):
            p.sub_(lr * (gr * masks[n] if n in masks else gr))
    trainer = trainer_factory(max_steps=1, limit_val_batches=0)
    trainer.fit(ft, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=16))
    for (n, a), (_, b) in zip(ft.model.named_parameters(), hand.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    for n, m in masks.items():
        assert (dict(ft.model.named_parameters())[n][m == 0] == 0).all()
