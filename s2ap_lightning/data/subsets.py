"""Seeded, class-stratified subsets of a split, and the labels they are drawn from.

Evaluation subsets must represent every class: image folders and many test files are sorted by class,
so "the first N images" can be one class only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset


def dataset_labels(data: Dataset) -> Tensor:
    """Every label of ``data`` as a 1-D long tensor, read without decoding images where possible."""
    if isinstance(data, Subset):
        return dataset_labels(data.dataset)[torch.as_tensor(list(data.indices), dtype=torch.long)]
    if isinstance(data, TensorDataset):
        return data.tensors[1].long()
    if isinstance(data, ConcatDataset):
        return torch.cat([dataset_labels(d) for d in data.datasets])
    for attr in ("targets", "labels"):  # torchvision: CIFAR / ImageFolder / MNIST, SVHN
        if hasattr(data, attr):
            return torch.as_tensor(getattr(data, attr)).long()
    return torch.as_tensor([int(data[i][1]) for i in range(len(data))], dtype=torch.long)


def stratified_indices(labels: Tensor, n: int, seed: int) -> Tensor:
    """``n`` indices of ``labels`` with every class in proportion (largest remainder), seeded.

    ``n >= len(labels)`` (or ``n <= 0``) returns every index. Indices are sorted, so a subset is
    iterated in the split's own order.
    """
    total = len(labels)
    if n <= 0 or n >= total:
        return torch.arange(total)
    g = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * n / total
    take = quota.floor().long()
    short = n - int(take.sum())
    if short:
        order = torch.argsort(quota - take.double(), descending=True, stable=True)
        take[order[:short]] += 1
    chosen = []
    for cls, k in zip(classes.tolist(), take.tolist(), strict=True):
        members = torch.nonzero(labels == cls).flatten()
        chosen.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.sort(torch.cat(chosen)).values


def class_counts(labels: Tensor) -> dict[int, int]:
    """``{class: images}`` of a label tensor, for records that say what a figure rests on."""
    classes, counts = torch.unique(labels, return_counts=True)
    return {int(c): int(k) for c, k in zip(classes.tolist(), counts.tolist(), strict=True)}


class IndexedDataset(Dataset):
    """``(x, y, i)`` for item ``i`` of a dataset: lets a distributed test count each image once."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple:
        x, y = self.data[i][:2]
        return x, y, i


@dataclass(frozen=True)
class DataSubset:
    """The fixed images an analysis tool reads: a seeded, class-stratified sample of one split.

    One typed block for every tool (``--subset.images 256 --subset.split test``), so sharpness,
    landscapes and security curves of two checkpoints are measured on the same images, and never on
    "the first N" of a split that may be sorted by class.

    Args:
        images: images in the sample (0: the whole split).
        split: ``val`` (default: the split model selection used) or ``test``.
        seed: seed of the sample.
        dataset: read another dataset than the one the checkpoint was trained on.
        data_dir: read the dataset from another folder.

    """

    images: int = 256
    split: Literal["val", "test"] = "val"
    seed: int = 0
    dataset: str | None = None
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.images < 0:
            raise ValueError(f"subset images={self.images} is out of range: valid are >= 0 (0: all)")
        if self.split not in ("val", "test"):
            raise ValueError(f"subset split={self.split!r} is unknown; valid: val, test")

    def tensors(self, data: Dataset) -> tuple[Tensor, Tensor]:
        """The sample of ``data`` (the chosen split) as ``(x, y)`` tensors, in the split's order."""
        chosen = stratified_indices(dataset_labels(data), self.images, self.seed)
        xs, ys = zip(*[data[int(i)][:2] for i in chosen], strict=True)
        return torch.stack(xs), torch.as_tensor(ys)
