"""Step timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import lightning as L
import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(L.Callback):
    """Wall time and mask computations of every optimiser step (after `skip` warm-up steps)."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.times: list[float] = []
        self.masks: list[int] = []
        self.images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync()
        self._t = time.perf_counter()
        scores = getattr(pl_module, "scores", None)
        self._m = scores.mask_computations if scores is not None else 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync()
        if batch_idx < self.skip:
            return
        self.times.append(time.perf_counter() - self._t)
        scores = getattr(pl_module, "scores", None)
        self.masks.append((scores.mask_computations if scores is not None else 0) - self._m)
        self.images += batch[0].shape[0]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def images_per_second(self) -> float:
        return self.images / sum(self.times)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
