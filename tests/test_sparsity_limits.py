"""A sparsity that would empty a prunable layer fails before training, naming the layers and the limit."""

import math
import re
from pathlib import Path

import pytest
import torch

from s2ap_lightning.cli import main
from s2ap_lightning.models import build_model
from s2ap_lightning.pruning.masks import kept_count, largest_feasible_sparsity
from s2ap_lightning.pruning.methods import Harp, Hydra
from s2ap_lightning.pruning.scores import prunable_weight_names

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = Path(__file__).resolve().parent / "configs" / "cli_fast.yaml"


def sizes(model):
    params = dict(model.named_parameters())
    return {n: params[n].numel() for n in prunable_weight_names(model)}


def largest_in(message):
    return float(re.search(r"keeps at least one weight in every layer is ([0-9.]+)", message).group(1))


def test_layer_scope_refuses_a_sparsity_that_empties_layers():
    model = build_model("small_cnn", 10, 3)
    n = sizes(model)
    empty = [name for name, k in n.items() if kept_count(k, 0.9999) == 0]
    assert len(empty) == 3, n  # the case: three of the four layers would keep nothing

    with pytest.raises(ValueError) as err:
        Hydra().build(model, 0.9999)
    message = str(err.value)
    assert "\n" not in message and message.startswith("sparsity=0.9999 leaves 3 of 4 prunable layers")
    for name in empty:
        assert f"{name} ({n[name]} weights)" in message
    kept_layer = next(name for name in n if name not in empty)
    assert kept_layer not in message
    # The limit is the smallest layer's: round((1 - s) * 432) >= 1, i.e. s < 1 - 0.5 / 432.
    best = largest_in(message)
    assert best == 0.99884 and best < 1 - 0.5 / min(n.values()) < best + 1e-5


def test_the_stated_largest_sparsity_passes_and_keeps_every_layer():
    model = build_model("small_cnn", 10, 3)
    with pytest.raises(ValueError) as err:
        Hydra().build(model, 0.999)
    best = largest_in(str(err.value))
    masks = Hydra().build(model, best).masks()
    assert all(int(m.sum()) >= 1 for m in masks.values())
    assert min(int(m.sum()) for m in masks.values()) == 1  # it is the limit: the smallest layer keeps one


def test_a_feasible_high_sparsity_passes():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 3)
    scores = Hydra().build(model, 0.998)
    counts = scores.kept_counts()
    assert all(c >= 1 for c in counts.values()) and counts == {
        name: kept_count(k, 0.998) for name, k in sizes(model).items()
    }


def test_largest_feasible_sparsity_reads_well_and_is_feasible():
    assert largest_feasible_sparsity(lambda s: kept_count(432, s) >= 1) == 0.99884
    assert largest_feasible_sparsity(lambda s: kept_count(3, s) >= 1) == 0.833
    assert largest_feasible_sparsity(lambda s: False) is None
    for n in (1, 2, 7, 100, 24112, 10**7):
        best = largest_feasible_sparsity(lambda s, n=n: kept_count(n, s) >= 1)
        # Feasible, and within a percent of the true limit 1 - 0.5 / n in the kept fraction.
        assert kept_count(n, best) >= 1 and 0.5 / n <= 1 - best <= 1.01 * 0.5 / n, n


def test_global_scope_keeps_a_weight_per_layer_and_refuses_a_budget_below_that():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 3)
    total = sum(sizes(model).values())
    # Global already keeps >= 1 weight in every layer (and min_layer_keep more), even at 0.999...
    for keep in (0.0, 0.0005):
        counts = Hydra(scope="global", min_layer_keep=keep).build(model, 0.999).kept_counts()
        assert min(counts.values()) >= max(1, round(keep * 432)), counts
        assert sum(counts.values()) == kept_count(total, 0.999)
    # ... but a budget smaller than the number of layers would silently exceed the sparsity asked.
    with pytest.raises(ValueError) as err:
        Hydra(scope="global").build(model, 0.9999)
    message = str(err.value)
    assert f"allows 2 of {total} weights, fewer than one for each of the 4 prunable layers" in message
    best = largest_in(message)
    assert kept_count(total, best) >= 4 > kept_count(total, best + 1e-6)
    Hydra(scope="global").build(model, best)


def test_harp_unbounded_rates_could_empty_a_layer():
    model = build_model("small_cnn", 10, 3)
    # k_min = 0.1 * 0.01 = 0.001: the 432-weight first conv could fall to round(0.432) = 0 weights.
    with pytest.raises(ValueError) as err:
        Harp(rate_bound=None).build(model, 0.99)
    message = str(err.value)
    assert "rate_bound=None" in message and "features.0.weight (432 weights)" in message
    assert "keep fraction to 0.001" in message and "\n" not in message
    best = largest_in(message)
    harp = Harp(rate_bound=None).build(model, best)
    with torch.no_grad():
        for r in harp.rates.values():
            r.fill_(-1e4)  # the floor an unbounded rate approaches
    assert min(harp.kept_counts().values()) >= 1


def test_harp_bounded_rates_keep_a_weight_at_their_floor():
    model = build_model("small_cnn", 10, 3)
    harp = Harp().build(model, 0.99)  # rate_bound 6: the floor is k_min + (1 - k_min) * sigmoid(-6)
    with torch.no_grad():
        for r in harp.rates.values():
            r.fill_(-10.0)
    harp.clamp_rates_()
    assert min(harp.kept_counts().values()) >= 1
    assert harp.method.lowest_keep_fraction(0.99) == pytest.approx(0.001 + 0.999 / (1 + math.exp(6)))
    # HARP starts at the target, so its start is refused as the per-layer top-k is.
    with pytest.raises(ValueError, match=r"sparsity=0.9999 leaves 3 of 4 prunable layers"):
        Harp().build(model, 0.9999)


def test_cli_refuses_before_training_with_one_line(tmp_path, capsys):
    args = ["fit"]
    for config in (CONFIGS / "stages" / "s2ap.yaml", CONFIGS / "data" / "synthetic.yaml", FAST):
        args += ["--config", str(config)]
    out = tmp_path / "run"
    args += ["--checkpoint.dirpath", str(out), "--trainer.default_root_dir", str(tmp_path / "root")]
    assert main([*args, "--model.sparsity", "0.9999"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("s2ap: error: sparsity=0.9999 leaves ")
    assert "features.0.weight (" in err and "the largest sparsity that keeps at least one weight" in err
    assert not out.exists() and not (tmp_path / "root").exists()
