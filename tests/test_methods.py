"""The base-method plug-in: a new method is one subclass, registered, configurable and buildable."""

import pytest
import torch

from s2ap_lightning.models import build_model
from s2ap_lightning.pruning.masks import topk_mask
from s2ap_lightning.pruning.methods import (
    METHODS,
    BaseMethod,
    Harp,
    Hydra,
    MethodState,
    method_from_config,
    method_from_legacy,
    method_names,
)
from s2ap_lightning.pruning.scores import prunable_weight_names, score_key


class KeepLargestState(MethodState):
    """Every layer keeps a fixed fraction of its largest ``|s|``; the classifier optionally all."""

    def kept_counts(self) -> dict[str, int]:
        counts = {n: max(1, round(self.method.keep * s.numel())) for n, s in self.items()}
        if self.method.dense_last:
            counts[self.names[-1]] = self[self.names[-1]].numel()
        return counts


class KeepLargest(BaseMethod):
    """A toy method, as a user would write it in its own module: options, checks, a state class."""

    name = "toy_keep_largest"
    mask_defining = ("keep", "dense_last")
    state_class = KeepLargestState

    def __init__(self, keep: float = 0.25, dense_last: bool = True) -> None:
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep={keep!r} is out of range: valid range is (0, 1]")
        self.keep = keep
        self.dense_last = dense_last


def small_model():
    torch.manual_seed(0)
    return build_model("small_cnn", 4, 3)


def test_subclassing_registers_the_method():
    assert METHODS["toy_keep_largest"] is KeepLargest
    assert method_names()[:2] == ("hydra", "harp") and "toy_keep_largest" in method_names()


@pytest.mark.parametrize("dense_last", [True, False])
def test_toy_method_builds_and_its_masks_keep_its_counts(dense_last):
    model = small_model()
    state = KeepLargest(keep=0.3, dense_last=dense_last).build(model, 0.9)
    assert isinstance(state, KeepLargestState) and state.names == prunable_weight_names(model)
    with torch.no_grad():  # scores away from magnitude order, so the ranking is the scores'
        for _, s in state.items():
            s.copy_(torch.randn_like(s))
    masks = state.masks()
    last = state.names[-1]
    for name, mask in masks.items():
        n = mask.numel()
        expected = n if dense_last and name == last else round(0.3 * n)
        assert int(mask.sum()) == expected, name
        assert torch.equal(mask, topk_mask(state[name], expected)), name
    assert state.density(masks) > 0.3 if dense_last else state.density(masks) == pytest.approx(0.3, abs=0.01)
    # Only the scores are state; the neutral hooks are HYDRA's.
    assert set(state.state_dict()) == {f"scores.{score_key(n)}" for n in state.names}
    assert state.extra_loss() is None and state.within_budget() and state.end_of_epoch(0.3, 0) == {}


def test_toy_state_round_trips_through_its_state_dict():
    model = small_model()
    a = KeepLargest().build(model, 0.9)
    with torch.no_grad():
        for _, s in a.items():
            s.mul_(torch.randn_like(s))
    b = KeepLargest().build(model, 0.9)
    assert any(not torch.equal(a.masks()[n], b.masks()[n]) for n in a.names)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.masks()[n], b.masks()[n]) for n in a.names)


def test_method_from_config_takes_a_name_a_mapping_or_an_object():
    toy = KeepLargest(keep=0.5, dense_last=False)
    config = toy.config()
    assert config == {
        "class_path": f"{__name__}.KeepLargest",
        "init_args": {"keep": 0.5, "dense_last": False},
    }
    assert method_from_config(config) == toy
    assert method_from_config(toy) is toy
    assert method_from_config("toy_keep_largest") == KeepLargest()
    assert method_from_config({"class_path": "toy_keep_largest", "init_args": {"keep": 0.1}}) == KeepLargest(
        0.1
    )
    # The built-ins by registry name, class name or any import path of the class.
    harp = Harp(rate_bound=3.0, rate_grad="keep")
    assert method_from_config(harp.config()) == harp
    assert (
        method_from_config({"class_path": "Harp", "init_args": {"rate_bound": 3, "rate_grad": "keep"}})
        == harp
    )
    assert method_from_config("s2ap_lightning.pruning.Hydra") == Hydra() != Harp()
    assert (
        repr(harp) == "Harp(size_loss_weight=1.0, rate_grad='keep', rate_bound=3.0, density_tolerance=0.005)"
    )


def test_method_from_config_names_what_is_wrong():
    with pytest.raises(
        ValueError, match=r"method='hydar' is unknown; valid: hydra, harp, .*toy_keep_largest"
    ):
        method_from_config("hydar")
    with pytest.raises(
        ValueError, match=r"method 'harp' has no option scope; valid: size_loss_weight, rate_grad"
    ):
        method_from_config({"class_path": "harp", "init_args": {"scope": "global"}})
    with pytest.raises(ValueError, match=r"needs 'class_path'.*not rate_bound"):
        method_from_config({"class_path": "harp", "rate_bound": 3})
    with pytest.raises(ValueError, match="is unknown"):
        method_from_config("torch.nn.Linear")  # importable, but not a method


def test_old_flat_hyperparameters_map_to_the_method_they_chose():
    old = {  # what every checkpoint before the split stored, whichever method ran
        "sparsity": 0.9,
        "gamma": 0.01,
        "base_method": "harp",
        "size_loss_weight": 0.5,
        "rate_grad": "keep",
        "rate_bound": None,
        "density_tolerance": 0.01,
        "scope": "layer",
        "min_layer_keep": 0.0,
    }
    assert method_from_legacy(old) == Harp(
        size_loss_weight=0.5, rate_grad="keep", rate_bound=None, density_tolerance=0.01
    )
    hydra = method_from_legacy({**old, "base_method": "hydra", "scope": "global", "min_layer_keep": 0.02})
    assert hydra == Hydra(scope="global", min_layer_keep=0.02)
    assert method_from_legacy({"sparsity": 0.9}) == Hydra(), "hydra with its defaults when nothing was stored"
    with pytest.raises(ValueError, match="scope='global' does not apply to base_method='harp'"):
        method_from_legacy({**old, "scope": "global"})
    with pytest.raises(ValueError, match="base_method='snip' is unknown; valid: hydra, harp"):
        method_from_legacy({"base_method": "snip"})


def test_old_checkpoint_keys_are_unchanged_relative_to_the_state():
    model = small_model()
    layers = [score_key(n) for n in prunable_weight_names(model)]
    assert set(Hydra().build(model, 0.8).state_dict()) == {f"scores.{k}" for k in layers}
    harp = set(Harp().build(model, 0.8).state_dict())
    schedule = {"size_weight", "size_weight_frozen", "size_above_target", "budget_met"}
    assert harp == {f"scores.{k}" for k in layers} | {f"rates.{k}" for k in layers} | schedule


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: KeepLargest(keep=0.0), r"keep=0.0 is out of range: valid range is \(0, 1\]"),
        (lambda: Hydra(scope="local"), "scope='local' is unknown; valid: layer, global"),
        (
            lambda: Hydra(min_layer_keep=1.5),
            r"min_layer_keep=1.5 is out of range: valid range is \[0.0, 1.0\]",
        ),
        (
            lambda: Harp(size_loss_weight=-1.0),
            r"size_loss_weight=-1.0 is out of range: valid range is \[0.0, inf\)",
        ),
        (lambda: Harp(rate_grad="mean"), "rate_grad='mean' is unknown; valid: logit, keep"),
        (
            lambda: Harp(rate_bound=-2.0),
            r"rate_bound=-2.0 is out of range: valid range is \(0.0, inf\)",
        ),
        (
            lambda: Harp(density_tolerance=2.0),
            r"density_tolerance=2.0 is out of range: valid range is \[0.0, 1.0\]",
        ),
        (
            lambda: Hydra(scope="global", min_layer_keep=0.2).check_sparsity(0.9),
            r"min_layer_keep=0.2 .*\[0, 0.1\]",
        ),
        (lambda: Harp().check_sparsity(1.0), r"sparsity=1.0 is out of range: it must lie in \(0, 1\)"),
        (lambda: KeepLargest().build(small_model(), 0.0), r"sparsity=0.0 is out of range"),
    ],
)
def test_bad_option_values_fail_naming_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_only_mask_defining_options_count_as_a_different_mask():
    assert Hydra(scope="global").mask_differences(Hydra()) == {"scope": ("global", "layer")}
    assert Hydra().mask_differences(Harp()) == {"method": ("hydra", "harp")}
    assert Harp(rate_bound=3.0).mask_differences(Harp()) == {}, "HARP's mask is its learnt rates"
    assert KeepLargest(0.5).mask_differences(KeepLargest(0.25, dense_last=False)) == {
        "keep": (0.5, 0.25),
        "dense_last": (True, False),
    }


def test_a_method_that_could_not_be_configured_is_refused_at_class_creation():
    with pytest.raises(TypeError, match=r"method name 'hydra' .* is taken by .*Hydra"):

        class Clash(Hydra):
            name = "hydra"

    with pytest.raises(TypeError, match="option 'keep' has no default"):

        class NoDefault(BaseMethod):
            name = "toy_no_default"
            state_class = KeepLargestState

            def __init__(self, keep: float) -> None:
                self.keep = keep

    with pytest.raises(TypeError, match="mask_defining names rate, which are not its options"):

        class BadMaskDefining(KeepLargest):
            name = "toy_bad_mask_defining"
            mask_defining = ("rate",)

    with pytest.raises(TypeError, match="sets no state_class"):

        class NoState(BaseMethod):
            name = "toy_no_state"

    assert not any(n.startswith("toy_") and n != "toy_keep_largest" for n in METHODS)


def test_jsonargparse_parses_a_method_as_a_nested_subclass_option():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--method", type=BaseMethod)
    parsed = parser.instantiate(parser.parse_args(["--method", "Harp", "--method.rate_bound", "3"]))
    assert parsed.method == Harp(rate_bound=3.0)
    with pytest.raises(ValueError, match=r"rate_bound=-1.0 is out of range"):
        parser.instantiate(parser.parse_args(["--method", "Harp", "--method.rate_bound", "-1"]))
