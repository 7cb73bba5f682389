import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from s2ap_lightning.models import build_model
from s2ap_lightning.pruning import (
    Hydra,
    kept_count,
    masked_forward,
    prunable_weight_names,
    scaled_score_init,
    topk_mask,
)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "vgg16_bn", "wrn28_4"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.95, 0.99])
def test_exact_kept_count_per_layer(arch, sparsity):
    torch.manual_seed(0)
    model = build_model(arch, 10, 3)
    scores = Hydra().build(model, sparsity)
    masks = scores.masks()
    assert set(masks) == set(prunable_weight_names(model))
    for name, mask in masks.items():
        assert int(mask.sum()) == round((1 - sparsity) * mask.numel()), name
        assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_prunable_layers_cover_every_conv_and_linear():
    names = prunable_weight_names(build_model("resnet18", 10, 3))
    assert names[0] == "conv1.weight" and names[-1] == "linear.weight"
    assert "layer2.0.shortcut.0.weight" in names
    assert not any("bn" in n or n.endswith("bias") for n in names)


def test_kept_count_rejects_out_of_range():
    with pytest.raises(ValueError, match="sparsity"):
        kept_count(10, 1.5)
    with pytest.raises(ValueError, match=r"sparsity.*\(0, 1\)"):
        Hydra().build(build_model("small_cnn", 10, 1), 1.0)


def test_topk_selects_largest_magnitude():
    s = torch.tensor([0.1, -5.0, 2.0, -0.3, 4.0])
    assert topk_mask(s, 2).tolist() == [0, 1, 0, 0, 1]
    assert topk_mask(s, 0).sum() == 0


def test_scaled_score_init_is_magnitude_pruning():
    torch.manual_seed(1)
    model = build_model("small_cnn", 10, 1)
    scores = Hydra().build(model, 0.8)
    params = dict(model.named_parameters())
    for name, mask in scores.masks().items():
        w = params[name]
        k = round(0.2 * w.numel())
        assert torch.equal(mask, topk_mask(w, k)), name
        s = scores[name]
        fan_in = w[0].numel()
        assert torch.allclose(s.abs().max(), torch.tensor((6 / fan_in) ** 0.5))
        assert torch.allclose(s, scaled_score_init(w))


def test_straight_through_gradient_is_sign_s_times_w_times_grad_weff():
    torch.manual_seed(2)
    model = build_model("small_cnn", 4, 3)
    scores = Hydra().build(model, 0.7)
    with torch.no_grad():  # random signs so that sign(s) matters
        for _, s in scores.items():
            s.mul_(torch.randn_like(s).sign())
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 4, (8,))
    masks = scores.masks()
    loss = F.cross_entropy(masked_forward(model, scores.effective_weights(model, masks), x), y)
    loss.backward()
    # Reference: make the effective weights leaves and take dL/dw_eff directly.
    params = dict(model.named_parameters())
    w_eff = {n: (params[n].detach() * masks[n]).requires_grad_(True) for n in masks}
    ref_loss = F.cross_entropy(functional_call(model, w_eff, (x,), strict=False), y)
    grads = torch.autograd.grad(ref_loss, list(w_eff.values()))
    for (name, w), g in zip(w_eff.items(), grads, strict=True):
        expected = scores[name].sign() * params[name].detach() * g
        assert torch.allclose(scores[name].grad, expected, atol=1e-7), name
        pruned = masks[name] == 0
        assert pruned.any() and scores[name].grad[pruned].abs().sum() > 0, "pruned scores get gradient"


def test_effective_weights_have_exact_zeros():
    model = build_model("small_cnn", 10, 1)
    scores = Hydra().build(model, 0.9)
    masks = scores.masks()
    for name, w in scores.effective_weights(model, masks, differentiable=True).items():
        assert (w.detach()[masks[name] == 0] == 0).all()
        assert (w.detach()[masks[name] == 1] != 0).all()


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_batched_topk_selects_what_per_layer_topk_selects(arch):
    from s2ap_lightning.pruning.masks import topk_masks

    torch.manual_seed(0)
    scores = Hydra().build(build_model(arch, 10, 3), 0.9)
    with torch.no_grad():
        for _, s in scores.items():
            s.add_(1e-3 * torch.randn_like(s))  # no exact ties
    counts = scores.kept_counts()
    items = scores.items()
    batched = topk_masks([s for _, s in items], [counts[n] for n, _ in items])
    for (name, s), m in zip(items, batched):
        assert torch.equal(m, topk_mask(s, counts[name])), name


def test_perturbation_is_restored_exactly_even_on_error():
    from s2ap_lightning.pruning import layerwise_perturbation, perturbed

    torch.manual_seed(0)
    params = {"a": torch.randn(5, 3), "b": torch.randn(7)}
    grads = {"a": torch.randn(5, 3), "b": torch.zeros(7)}
    z = layerwise_perturbation(params, grads, 0.1)
    assert torch.allclose(z["a"].norm(), 0.1 * params["a"].norm()) and torch.equal(z["b"], torch.zeros(7))
    before = {k: v.clone() for k, v in params.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with perturbed(params, z):
            assert torch.equal(params["a"], before["a"] + z["a"])
            raise RuntimeError("boom")
    assert all(torch.equal(params[k], before[k]) for k in params), "restored bit for bit after an error"
