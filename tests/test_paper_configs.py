"""Every config of the paper's grid parses, and its model and data instantiate on tiny inputs."""

from pathlib import Path

import pytest
import torch

from s2ap_lightning.cli import run_cli

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
FILES = sorted(PAPER.rglob("*.yaml"))


def test_grid_is_complete():
    rows = [f for f in FILES if f.stem not in ("pretrain", "finetune")]
    # (CIFAR-10, SVHN) x (R18, VGG16, WRN) x 3 sparsities x (HYDRA, HARP) x (base, +S2AP)
    # + ViT (HYDRA only) + ImageNet ResNet-50 x 3 x 2 x 2.
    assert len(rows) == 2 * 3 * 3 * 2 * 2 + 2 * 3 * 2 + 3 * 2 * 2 == 96
    assert (PAPER / "imagenet" / "resnet50" / "harp_s2ap_sp0.95.yaml").is_file()


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    from test_data_models import write_image_folder

    root = tmp_path_factory.mktemp("imagenet")
    write_image_folder(root, classes=2, per_class=1, size=8)
    return root


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PAPER)))
def test_paper_config_instantiates(path, imagenet_dir):
    args = [
        "--config",
        str(path),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.logger",
        "false",
    ]
    if "imagenet" in path.parts:
        args += ["--data.data_dir", str(imagenet_dir)]
    cli = run_cli(args, run=False)
    model, data = cli.model, cli.datamodule
    assert model.hparams.num_classes == data.num_classes
    size = 64 if "imagenet" in path.parts else 32
    with torch.no_grad():
        out = model.model.eval()(torch.rand(2, 3, size, size))
    assert out.shape == (2, data.num_classes)
    eps = 4 / 255 if "imagenet" in path.parts else 8 / 255
    assert model.threat.eps == pytest.approx(eps) and model.hparams["threat"]["eps"] == pytest.approx(eps)
    if path.stem not in ("pretrain", "finetune"):
        method, *rest = path.stem.split("_")
        assert model.method_spec.name == method
        assert model.hparams["method"]["class_path"].rsplit(".", 1)[-1].lower() == method
        assert (model.hparams.gamma > 0) == ("s2ap" in rest)
        assert model.hparams.sparsity == float(rest[-1].removeprefix("sp"))
