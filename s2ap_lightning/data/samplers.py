"""A training sampler that makes mid-epoch resume exact, in one process or sharded over ranks."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Shuffles with a generator seeded by ``seed + epoch``, shards over ranks, skips consumed batches.

    Lightning resumes a mid-epoch checkpoint at the right batch index but restarts the data loader at
    its first batch, so without help the resumed epoch sees different data than the interrupted one
    would have. This sampler's order depends only on ``(seed, epoch, num_replicas, rank)``, and
    :meth:`skip_next` drops the samples this rank already consumed before the interruption.

    It is a :class:`~torch.utils.data.DistributedSampler` (same permutation, same padding, same
    ``rank::num_replicas`` shards), so under a DDP strategy Lightning uses it as it is instead of
    wrapping it: the wrapper indexes what a sampler yields by its ``len``, which a skipping sampler
    cannot honour, and would apply the skip to the global order instead of this rank's shard. With
    one process (the default) the order is the plain ``randperm`` of ``seed + epoch``.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} is out of range for num_replicas={num_replicas}")
        # DistributedSampler only needs the dataset's length.
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._skip = 0
        #: The world size of the checkpoint this sampler was restored from (None: not restored).
        self.restored_replicas: int | None = None

    def skip_next(self, samples: int) -> None:
        """The next iteration starts ``samples`` into this rank's share of this epoch's order."""
        if self.restored_replicas is not None and self.restored_replicas != self.num_replicas:
            raise ValueError(
                f"resuming mid-epoch on {self.num_replicas} process(es), but the checkpoint's epoch was "
                f"split over {self.restored_replicas}: the batches already seen cannot be skipped exactly. "
                f"Resume with {self.restored_replicas} process(es), or from a checkpoint written at the "
                "end of an epoch"
            )
        self._skip = samples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """The training loader, stateful the way Lightning expects (``state_dict``/``load_state_dict``).

    Its state is the sampler's ``(seed, epoch, num_replicas)``, which fixes this rank's data order for
    the epoch. The batches a killed epoch had already processed are skipped by the stage (Lightning's
    batch progress knows how many it processed; the loader cannot, as Lightning fetches one batch
    ahead). Resuming under another seed would silently change the data order, so it is refused.
    """

    def _resumable(self) -> ResumableSampler | None:
        return self.sampler if isinstance(self.sampler, ResumableSampler) else None

    def state_dict(self) -> dict[str, int]:
        sampler = self._resumable()
        if sampler is None:
            return {}
        return {"seed": sampler.seed, "epoch": sampler.epoch, "num_replicas": sampler.num_replicas}

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
        # Checkpoints written before the loader recorded it ran in one process.
        sampler.restored_replicas = int(state.get("num_replicas", 1))
