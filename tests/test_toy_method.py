"""A new base method is one module: a search runs with it from the command line, checkpoints keep it.

tests/toy_method.py defines the method (as a user's own module would); nothing in the package names it.
"""

from __future__ import annotations

import pytest
import torch

from s2ap_lightning.cli import main
from s2ap_lightning.stages import RobustPretrainer, ScoreSpaceSAMPruner

DATA = [
    "--data.dataset", "synthetic", "--data.synthetic_samples", "96", "--data.synthetic_image_size", "8",
    "--data.synthetic_classes", "4", "--data.batch_size", "32",
]  # fmt: skip
TRAINER = [
    "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.logger", "false",
    "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
]  # fmt: skip
MODEL = ["--model.model", "small_cnn", "--model.threat.eps", "0.1", "--model.threat.step_size", "0.03",
         "--model.threat.steps", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrain") / "dense.pt"
    torch.manual_seed(0)
    model = RobustPretrainer(model="small_cnn", num_classes=4, in_channels=3, image_size=8).model
    torch.save(model.state_dict(), path)
    return path


def search(tmp_path, pretrained, *extra):
    out = tmp_path / "search"
    code = main(
        ["fit", *DATA, *TRAINER, "--model", "ScoreSpaceSAMPruner", *MODEL, "--model.sparsity", "0.8",
         "--model.gamma", "0.01", "--model.warmup_epochs", "0", "--model.init_from", str(pretrained),
         "--checkpoint.dirpath", str(out), *extra]
    )  # fmt: skip
    return code, out


def test_a_search_runs_with_a_method_from_a_users_module(tmp_path, pretrained):
    code, out = search(
        tmp_path, pretrained, "--model.method", "toy_method.HeadKeep", "--model.method.head_keep", "0.5"
    )
    assert code == 0
    saved = torch.load(out / "last.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["method"] == {
        "class_path": "toy_method.HeadKeep",
        "init_args": {"head_keep": 0.5},
    }
    # The method's own mask rule ran: the classifier keeps half its weights, the others 20 %.
    masks = saved["masks"]
    head = list(masks)[-1]
    assert int(masks[head].sum()) == round(0.5 * masks[head].numel())
    first = list(masks)[0]
    assert int(masks[first].sum()) == round(0.2 * masks[first].numel())
    # The checkpoint rebuilds the same method and masks (weights_only, no surgery).
    module = ScoreSpaceSAMPruner.load_from_checkpoint(out / "last.ckpt", weights_only=True)
    assert type(module.method_spec).__name__ == "HeadKeep" and module.method_spec.head_keep == 0.5
    with torch.no_grad():
        rebuilt = module.method.masks()
    assert all(torch.equal(rebuilt[n].bool(), m) for n, m in masks.items())


def test_testing_under_another_mask_defining_option_is_refused(tmp_path, pretrained, capsys):
    code, out = search(
        tmp_path, pretrained, "--model.method", "toy_method.HeadKeep", "--model.method.head_keep", "0.5"
    )
    assert code == 0
    code = main(
        ["test", *DATA, "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--model", "ScoreSpaceSAMPruner",
         "--model.method", "toy_method.HeadKeep", "--model.method.head_keep", "0.25",
         "--model.evaluation.aa_images", "0", "--ckpt_path", str(out / "last.ckpt"),
         "--trainer.default_root_dir", str(tmp_path)]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "another network than the checkpoint holds" in err and "head_keep" in err


def test_a_bad_option_of_the_users_method_fails_before_training(tmp_path, pretrained, capsys):
    code, out = search(
        tmp_path, pretrained, "--model.method", "toy_method.HeadKeep", "--model.method.head_keep", "1.5"
    )
    assert code == 2
    assert "head_keep=1.5" in capsys.readouterr().err
    assert not out.exists() or not any(out.glob("*.ckpt"))
