"""A small robust model for evaluation tests: an MLP adversarially trained on scikit-learn's digits.

Trained in about a second with plain PGD adversarial training (L-inf eps 0.1 on 8x8 images in
[0, 1]), so the checks see a model whose robustness is real, and wrappers that break its gradients
in the ways gradient masking does.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2ap_lightning.attacks import ThreatModel, attack_context, pgd_ce


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread while tiny models run (restored after).

    An 8x8 MLP's operations are far too small to split across threads; on a loaded machine a second
    thread only adds waiting, which slowed AutoAttack on it twentyfold.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


THREAT = ThreatModel(eps=0.1, step_size=0.025, steps=10)
N_TRAIN = 1400


@functools.lru_cache(maxsize=1)
def digits() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as (N, 1, 8, 8) images in [0, 1] and long labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


def held_out(n: int | None = None) -> tuple[Tensor, Tensor]:
    """Images the model was not trained on (the last 397; the first ``n`` of them)."""
    x, y = digits()
    x, y = x[N_TRAIN:], y[N_TRAIN:]
    return (x, y) if n is None else (x[:n], y[:n])


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@functools.lru_cache(maxsize=1)
def _trained_state() -> dict[str, Tensor]:
    x, y = digits()
    x, y = x[:N_TRAIN], y[:N_TRAIN]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_attack = THREAT.with_steps(5)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(15):
            for idx in torch.randperm(len(x), generator=g).split(100):
                with attack_context(model):
                    x_adv = pgd_ce(model, x[idx], y[idx], train_attack)
                opt.zero_grad()
                F.cross_entropy(model(x_adv), y[idx]).backward()
                opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained_mlp() -> nn.Module:
    """A fresh copy of the adversarially trained MLP, in eval mode."""
    model = mlp()
    model.load_state_dict(_trained_state())
    return model.eval()


class Saturated(nn.Module):
    """Logits times 1e4: softmax saturates, the cross-entropy loss and its gradient round to 0."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) * 1e4


class Quantised(nn.Module):
    """Inputs rounded to the digits' 17 grey levels first: rounding has a zero gradient."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(torch.round(x * 16) / 16)


class Noisy(nn.Module):
    """Gaussian noise on the inputs at every call: a randomised model."""

    def __init__(self, model: nn.Module, std: float = 0.3) -> None:
        super().__init__()
        self.model, self.std = model, std

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x + self.std * torch.randn_like(x))


class Constant(nn.Module):
    """Always the same logits: a collapsed model (it answers class ``label`` whatever the input)."""

    def __init__(self, num_classes: int = 10, label: int = 0) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_classes))
        with torch.no_grad():
            self.logits[label] = 3.0

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(len(x), -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)
