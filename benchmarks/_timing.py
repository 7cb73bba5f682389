"""Step timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import lightning as L
import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class MaskCounter:
    """Counts the mask computations of a built base method by wrapping its ``masks`` on the instance.

    The package keeps no counter on its hot path; only the benchmarks want the figure.
    """

    def __init__(self, state: object) -> None:
        self.calls = 0
        original = state.masks

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        state.masks = counted


class StepTimer(L.Callback):
    """Wall time and mask computations of every optimiser step (after `skip` warm-up steps)."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.times: list[float] = []
        self.masks: list[int] = []
        self.images = 0
        self._counter: MaskCounter | None = None

    def _mask_calls(self, pl_module) -> int:
        state = getattr(pl_module, "method", None)  # the mask search's built base method
        if state is None:
            return 0
        if self._counter is None:
            self._counter = MaskCounter(state)
        return self._counter.calls

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync()
        self._t = time.perf_counter()
        self._m = self._mask_calls(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync()
        if batch_idx < self.skip:
            return
        self.times.append(time.perf_counter() - self._t)
        self.masks.append(self._mask_calls(pl_module) - self._m)
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


class ThroughputTimer(L.Callback):
    """End-to-end images per second over the steps after the first ``skip``.

    The device is synchronised before the first timed step and after the last one only, so the
    figure includes Lightning's loop, data loading and hooks and lets the host run ahead of the GPU
    as it does in a real run. For per-phase device times see ``profile_s2ap_step.py``.
    """

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.images = 0
        self.steps = 0
        self._start: float | None = None
        self._run_start: float | None = None
        self._end: float | None = None
        self.warmup_seconds = 0.0

    def on_train_start(self, trainer, pl_module):
        sync()
        self._run_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.skip:
            sync()
            self._start = time.perf_counter()
            self.warmup_seconds = self._start - (self._run_start or self._start)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx < self.skip:
            return
        self.images += batch[0].shape[0]
        self.steps += 1

    def on_train_epoch_end(self, trainer, pl_module):
        sync()
        self._end = time.perf_counter()

    @property
    def seconds(self) -> float:
        if self._start is None or self._end is None:
            raise RuntimeError("no timed step: raise the number of batches above `skip`")
        return self._end - self._start

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps


def bench_trainer(callbacks: list[L.Callback], **overrides: object) -> L.Trainer:
    """One training epoch (unless overridden), one device, no validation, nothing written."""
    settings: dict[str, object] = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    settings.update(overrides)
    return L.Trainer(callbacks=callbacks, **settings)
