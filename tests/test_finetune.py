import pytest
import torch

from s2ap_lightning.checkpoint import CheckpointError
from s2ap_lightning.models import build_model
from s2ap_lightning.pruning import ScoreSet
from s2ap_lightning.stages import MaskedFinetuner, RobustPretrainer


@pytest.fixture
def pruned_state_dict_file(tmp_path, fast_kwargs):
    torch.manual_seed(0)
    model = build_model("small_cnn", fast_kwargs["num_classes"], fast_kwargs["in_channels"])
    masks = ScoreSet(model, 0.8).masks()
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
    expected = pruner.scores.masks()
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
