"""Checkpoints written before the typed option blocks still load, with the same settings and masks.

The files (tests/data/legacy_checkpoints, see its README) were written at commit 2970fa5, when the
stages took flat options (``eps``, ``eval_pgd_steps``, ``aa_seed``, ``base_method``, ...) and the base
method's state lived under ``scores.``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from s2ap_lightning.attacks import ThreatModel
from s2ap_lightning.cli import main
from s2ap_lightning.pruning.methods import Harp, Hydra
from s2ap_lightning.stages import MaskedFinetuner, RobustPretrainer, ScoreSpaceSAMPruner

LEGACY = Path(__file__).parent / "data" / "legacy_checkpoints"


def test_flat_threat_and_evaluation_options_map_into_the_blocks():
    module = RobustPretrainer.load_from_checkpoint(LEGACY / "pretrain.ckpt", weights_only=True)
    assert module.threat == ThreatModel(eps=0.1, step_size=0.03, steps=2, norm="linf")
    assert (module.evaluation.pgd_steps, module.evaluation.aa_images, module.evaluation.seed) == (3, 16, 3)
    # Saved again, the hyper-parameters are the blocks only (no flat leftovers), and primitive.
    assert "eps" not in module.hparams and module.hparams["threat"]["eps"] == 0.1
    assert isinstance(module.hparams["evaluation"], dict)


@pytest.mark.parametrize(
    ("name", "kind", "options"), [("s2ap_hydra", Hydra, {}), ("s2ap_harp", Harp, {"rate_bound": 5.0})]
)
def test_mask_search_checkpoints_keep_their_method_and_masks(name, kind, options):
    path = LEGACY / f"{name}.ckpt"
    saved = torch.load(path, weights_only=True)
    module = ScoreSpaceSAMPruner.load_from_checkpoint(path, weights_only=True)
    assert isinstance(module.method_spec, kind)
    for key, value in options.items():
        assert getattr(module.method_spec, key) == value
    assert module.hparams.sparsity == 0.8 and module.hparams.gamma == 0.01
    # The scores moved from `scores.` to `method.` and give exactly the masks the search saved.
    with torch.no_grad():
        masks = module.method.masks()
    assert set(masks) == set(saved["masks"])
    for layer, mask in saved["masks"].items():
        assert torch.equal(masks[layer].bool(), mask), layer


def test_finetune_checkpoint_loads_with_its_mask():
    saved = torch.load(LEGACY / "finetune.ckpt", weights_only=True)
    module = MaskedFinetuner.load_from_checkpoint(LEGACY / "finetune.ckpt", weights_only=True)
    for layer, mask in saved["masks"].items():
        assert torch.equal(dict(module.masks.items())[layer].bool(), mask)


def test_s2ap_test_evaluates_a_legacy_checkpoint_at_its_trained_threat_model(tmp_path, capsys):
    ckpt = tmp_path / "finetune.ckpt"
    shutil.copy(LEGACY / "finetune.ckpt", ckpt)
    code = main(
        [
            "test",
            "--data.dataset", "synthetic",
            "--data.synthetic_samples", "96",
            "--data.synthetic_image_size", "8",
            "--data.synthetic_classes", "4",
            "--data.batch_size", "32",
            "--model", "MaskedFinetuner",
            "--model.evaluation.aa_images", "0",
            "--ckpt_path", str(ckpt),
            "--trainer.accelerator", "cpu",
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    record = json.loads((tmp_path / "finetune.eval.json").read_text())
    # The checkpoint's threat model (eps 0.1, not the class default 8/255); the command's evaluation.
    assert record["threat_model"]["eps"] == pytest.approx(0.1)
    assert record["protocol"]["aa_images"] == 0
    assert record["hyper_parameters"]["threat"]["eps"] == pytest.approx(0.1)


def test_init_from_a_legacy_search_checkpoint(tmp_path):
    finetuner = MaskedFinetuner(
        model="small_cnn",
        num_classes=4,
        in_channels=3,
        image_size=8,
        init_from=str(LEGACY / "s2ap_hydra.ckpt"),
    )
    finetuner.setup("fit")
    saved = torch.load(LEGACY / "s2ap_hydra.ckpt", weights_only=True)
    for layer, mask in saved["masks"].items():
        assert torch.equal(dict(finetuner.masks.items())[layer].bool(), mask)
