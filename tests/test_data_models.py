import pickle

import numpy as np
import pytest
import torch

from s2ap_lightning.data import RobustDataModule
from s2ap_lightning.models import MODELS, build_model


def test_digits_splits_are_fixed_disjoint_and_scaled():
    a, b = RobustDataModule("digits"), RobustDataModule("digits")
    a.setup(), b.setup()
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 1, 8)
    assert len(a.train_set) + len(a.val_set) + len(a.test_set) == 1797
    assert a.train_set.indices == b.train_set.indices
    assert not set(a.train_set.indices) & set(a.val_set.indices)
    x, _ = next(iter(a.train_dataloader()))
    assert x.shape[1:] == (1, 8, 8) and 0 <= x.min() and x.max() <= 1 and x.max() > 0.9


def test_unknown_dataset_lists_valid():
    with pytest.raises(ValueError, match="unknown dataset 'fashion_mnist'.*digits.*mnist_5k.*cifar10"):
        RobustDataModule("fashion_mnist")


def write_cifar10(root, n=20):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as fh:
            pickle.dump(
                {
                    "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    "labels": rng.integers(0, 10, n).tolist(),
                },
                fh,
            )
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    return base


def patched_md5(monkeypatch, cls, base):
    from torchvision.datasets.utils import calculate_md5

    def fix(entries):
        return [[name, calculate_md5(str(base / name))] for name, _ in entries]

    monkeypatch.setattr(cls, "train_list", fix(cls.train_list))
    monkeypatch.setattr(cls, "test_list", fix(cls.test_list))
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": calculate_md5(str(base / cls.meta["filename"]))})


def test_cifar10_real_on_disk_format(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    base = write_cifar10(tmp_path)
    patched_md5(monkeypatch, CIFAR10, base)
    dm = RobustDataModule("cifar10", data_dir=str(tmp_path), batch_size=8, val_fraction=0.1)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 100 and len(dm.test_set) == 20
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    xv, _ = dm.val_set[0]
    assert torch.equal(xv, dm.val_set[0][0]), "validation has no random augmentation"


@pytest.mark.parametrize("extra", [False, True])
def test_svhn_real_on_disk_format(tmp_path, monkeypatch, extra):
    from scipy.io import savemat
    from torchvision.datasets import SVHN
    from torchvision.datasets.utils import calculate_md5

    rng = np.random.default_rng(0)
    split_list = {}
    for split, n in (("train", 30), ("test", 10), ("extra", 20)):
        fname = f"{split}_32x32.mat"
        savemat(
            tmp_path / fname,
            {
                "X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                "y": rng.integers(1, 11, (n, 1)).astype(np.uint8),
            },
        )
        split_list[split] = ["", fname, calculate_md5(str(tmp_path / fname))]
    monkeypatch.setattr(SVHN, "split_list", split_list)
    dm = RobustDataModule("svhn", data_dir=str(tmp_path), batch_size=4, svhn_extra=extra)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == (50 if extra else 30) and len(dm.test_set) == 10

    labels = {int(dm.test_set[i][1]) for i in range(10)}
    assert labels <= set(range(10)), "label 10 means digit 0"


def test_missing_cifar_files_say_where(tmp_path):
    dm = RobustDataModule("cifar10", data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"cifar10 not found.*download: true"):
        dm.setup()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_forward(name):
    model = build_model(name, 10, 3).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_key_names_match_the_common_cifar_variant():
    keys = set(build_model("resnet18", 10, 3).state_dict())
    for k in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer2.0.shortcut.0.weight",
        "layer2.0.shortcut.1.running_var",
        "layer4.1.bn2.bias",
        "linear.weight",
        "linear.bias",
    ):
        assert k in keys
    assert not any("normalize" in k for k in keys), "normalisation statistics are not persistent"


def test_normalisation_inside_model():
    model = build_model("small_cnn", 10, 1, mean=[0.5], std=[0.25]).eval()
    plain = build_model("small_cnn", 10, 1).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(model(x), plain((x - 0.5) / 0.25), atol=1e-6)


def write_image_folder(root, classes=3, per_class=4, size=40, grey=False, wide=8, ext="JPEG"):
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (size, size + wide) if grey else (size, size + wide, 3)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"n0{c:07d}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(d / f"{i}.{ext}")


def test_image_folder_imagenet_layout(tmp_path):
    write_image_folder(tmp_path)
    dm = RobustDataModule(
        "imagefolder", data_dir=str(tmp_path), crop_size=32, batch_size=4, val_fraction=0.25
    )
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (3, 3, 32)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 12 and len(dm.test_set) == 12
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert dm.test_set[0][0].shape == (3, 32, 32)


def test_own_greyscale_folder_keeps_one_channel_and_its_size(tmp_path):
    write_image_folder(tmp_path, classes=2, size=25, grey=True, wide=0, ext="png")
    dm = RobustDataModule("imagefolder", data_dir=str(tmp_path), batch_size=4, val_fraction=0.25)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (2, 1, 25)
    dm.setup()
    x, _ = dm.test_set[0]
    assert x.shape == (1, 25, 25)
    # At its own size the evaluation transform changes no pixel (no resampling).
    from PIL import Image

    first = sorted((tmp_path / "val" / "n00000000").iterdir())[0]
    raw = torch.from_numpy(np.array(Image.open(first))).float() / 255
    assert torch.allclose(x[0], raw)
    # Default augmentation on 25x25 greyscale: random crop with padding, no random-resized crop, no flip.
    names = [type(t).__name__ for t in dm.train_set.dataset.transform.transforms]
    assert "RandomCrop" in names and "RandomResizedCrop" not in names and "RandomHorizontalFlip" not in names


def test_own_colour_folder_and_upsampling_warning(tmp_path):
    write_image_folder(tmp_path, classes=3, size=20, wide=0, ext="png")
    dm = RobustDataModule("imagefolder", data_dir=str(tmp_path), batch_size=4)
    assert (dm.in_channels, dm.image_size) == (3, 20)
    big = RobustDataModule("imagefolder", data_dir=str(tmp_path), crop_size=40, augmentation="none")
    with pytest.warns(UserWarning, match=r"20 px .* crop_size=40 upsamples them 4.0x in area"):
        big.setup()
    assert big.test_set[0][0].shape == (3, 40, 40)


@pytest.mark.parametrize(
    "damage,message",
    [
        ("no_val", r"expects '.*/val' with one sub-folder per class"),
        ("classes", r"hold different classes: only in train: \['n00000002'\]; only in val: none"),
        ("unreadable", r"cannot read image .*0.png"),
    ],
)
def test_own_folder_mistakes_are_named(tmp_path, damage, message):
    import shutil

    write_image_folder(tmp_path, classes=3, size=12, grey=True, wide=0, ext="png")
    if damage == "no_val":
        shutil.rmtree(tmp_path / "val")
    elif damage == "classes":
        shutil.rmtree(tmp_path / "val" / "n00000002")
    else:
        (tmp_path / "train" / "n00000000" / "0.png").write_bytes(b"not an image")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        dm = RobustDataModule("imagefolder", data_dir=str(tmp_path), batch_size=4)
        dm.setup()
        [dm.train_set.dataset[i] for i in range(len(dm.train_set.dataset))]


def test_image_folder_without_train_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train")):
        RobustDataModule("imagenet", data_dir=str(tmp_path))


@pytest.mark.parametrize("name,size", [("vit", 32), ("resnet50", 64)])
def test_vit_and_resnet50(name, size):
    from s2ap_lightning.pruning import prunable_weight_names

    model = build_model(name, 10, 3, image_size=size).eval()
    assert model(torch.rand(2, 3, size, size)).shape == (2, 10)
    names = prunable_weight_names(model)
    if name == "vit":
        assert "blocks.0.attn.qkv.weight" in names and "head.weight" in names
    else:
        import torchvision

        assert set(model.state_dict()) == set(torchvision.models.resnet50(num_classes=10).state_dict())


def test_vgg16_key_names_match_hydra_variant():
    state = build_model("vgg16_bn", 10, 3).state_dict()
    assert state["classifier.0.weight"].shape == (256, 2048)
    assert state["classifier.2.weight"].shape == (256, 256)
    assert state["classifier.4.weight"].shape == (10, 256)
    assert state["features.0.weight"].shape == (64, 3, 3, 3) and "features.1.running_mean" in state
    assert sum(k.endswith(".weight") and v.dim() == 4 for k, v in state.items()) == 13


def test_mnist_5k_from_the_installed_wheel():
    dm = RobustDataModule("mnist_5k", batch_size=16)
    dm.setup()
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 28)
    assert len(dm.test_set) == 1000 and len(dm.train_set) + len(dm.val_set) == 4000
    x, y = dm.test_set[0]
    assert x.shape == (1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    labels = torch.cat([dm.test_set.tensors[1], torch.as_tensor([dm.train_set[i][1] for i in range(10)])])
    assert set(labels.tolist()) <= set(range(10)) and len(set(dm.test_set.tensors[1].tolist())) == 10
    again = RobustDataModule("mnist_5k")
    again.setup()
    assert torch.equal(again.test_set.tensors[0], dm.test_set.tensors[0]), "the split is fixed"


def write_mnist_idx(root, n_train=30, n_test=10):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([2051, n, 28, 28], dtype=">i4").tobytes() + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([2049, n], dtype=">i4").tobytes() + labels.tobytes()
        )


def test_mnist_real_idx_format(tmp_path):
    write_mnist_idx(tmp_path)
    dm = RobustDataModule("mnist", data_dir=str(tmp_path), batch_size=5, val_fraction=0.2)
    assert dm.hparams.download is False
    dm.setup()
    assert len(dm.train_set) == 24 and len(dm.val_set) == 6 and len(dm.test_set) == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_missing_mnist_files_say_where(tmp_path):
    dm = RobustDataModule("mnist", data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"mnist not found.*download: true"):
        dm.setup()
