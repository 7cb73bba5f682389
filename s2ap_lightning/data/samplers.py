"""A training sampler that makes mid-epoch resume exact."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``seed + epoch`` and can skip what an epoch already used.

    Lightning resumes a mid-epoch checkpoint at the right batch index but restarts the data loader at
    its first batch, so without help the resumed epoch sees different data than the interrupted one
    would have. This sampler's order depends only on ``(seed, epoch)``, and :meth:`skip_next` drops the
    samples already consumed before the interruption.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, samples: int) -> None:
        """The next iteration starts ``samples`` into this epoch's order."""
        self._skip = samples

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        skip, self._skip = self._skip, 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.num_samples
