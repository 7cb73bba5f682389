"""A training sampler that makes mid-epoch resume exact."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


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


class ResumableLoader(DataLoader):
    """The training loader, stateful the way Lightning expects (``state_dict``/``load_state_dict``).

    Its state is the sampler's ``(seed, epoch)``, which fixes the data order of the epoch. The batches a
    killed epoch had already processed are skipped by the stage (Lightning's batch progress knows how
    many it processed; the loader cannot, as Lightning fetches one batch ahead). Resuming under another
    seed would silently change the data order, so it is refused.
    """

    def _resumable(self) -> ResumableSampler | None:
        return self.sampler if isinstance(self.sampler, ResumableSampler) else None

    def state_dict(self) -> dict[str, int]:
        sampler = self._resumable()
        return {} if sampler is None else {"seed": sampler.seed, "epoch": sampler.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self._resumable()
        if sampler is None or not state:
            return
        if state["seed"] != sampler.seed:
            raise ValueError(
                f"resuming with seed {sampler.seed}, but the checkpoint's data order used seed "
                f"{state['seed']}: pass --seed_everything {state['seed']} to resume exactly"
            )
        sampler.set_epoch(state["epoch"])
