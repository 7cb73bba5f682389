import pytest
import torch
import torch.nn.functional as F

from s2ap_lightning.attacks import AttackConfig, attack_context, build_robust_loss, pgd, pgd_ce
from s2ap_lightning.models import build_model


@pytest.fixture
def model_and_batch():
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 3)
    return model, torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_pgd_raises_loss_and_stays_in_ball(model_and_batch, norm, eps):
    model, x, y = model_and_batch
    cfg = AttackConfig(eps=eps, step_size=eps / 4, steps=10, norm=norm)
    with attack_context(model):
        x_adv = pgd_ce(model, x, y, cfg)
        with torch.no_grad():
            clean_loss = F.cross_entropy(model(x), y)
            adv_loss = F.cross_entropy(model(x_adv), y)
    assert adv_loss > clean_loss
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_attack_takes_input_gradients_only_and_restores_mode(model_and_batch):
    model, x, y = model_and_batch
    model.train()
    running = model.features[1].running_mean.clone()
    with attack_context(model):
        assert not model.training
        pgd_ce(model, x, y, AttackConfig(0.1, 0.03, 3))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model.features[1].running_mean, running), "eval mode: BN stats untouched"


def test_attack_works_under_inference_mode(model_and_batch):
    model, x, y = model_and_batch
    with torch.inference_mode():
        x_inf, y_inf = x.clone(), y.clone()
        with attack_context(model):
            x_adv = pgd_ce(model, x_inf.clone(), y_inf.clone(), AttackConfig(0.1, 0.03, 2))
    assert not torch.equal(x_adv, x)


@pytest.mark.parametrize("name", ["pgd_at", "trades", "mart"])
def test_robust_losses_are_differentiable(model_and_batch, name):
    model, x, y = model_and_batch
    loss_fn = build_robust_loss(name)
    x_adv = loss_fn.adversarial(model, x, y, AttackConfig(0.1, 0.03, 2), model)
    out = loss_fn(model, x, x_adv, y)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.classifier.weight.grad is not None


def test_trades_attack_maximises_kl(model_and_batch):
    model, x, y = model_and_batch
    trades = build_robust_loss("trades")
    model.eval()
    x_adv = trades.adversarial(model, x, y, AttackConfig(0.1, 0.03, 10), model)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        kl_adv = F.kl_div(F.log_softmax(model(x_adv), 1), p, reduction="sum")
        kl_start = F.kl_div(F.log_softmax(model(x + 0.001 * torch.randn_like(x)), 1), p, reduction="sum")
    assert kl_adv > 10 * kl_start


def test_bad_attack_config_messages():
    with pytest.raises(ValueError, match="norm"):
        AttackConfig(0.1, 0.1, 1, norm="l3")
    with pytest.raises(ValueError, match="steps"):
        AttackConfig(0.1, 0.1, 0)
    with pytest.raises(ValueError, match="unknown robust_loss"):
        build_robust_loss("fgsm")


def test_pgd_zero_eps_returns_input(model_and_batch):
    model, x, y = model_and_batch
    with attack_context(model):
        x_adv = pgd(model, x, lambda z: F.cross_entropy(z, y), AttackConfig(0.0, 0.01, 3))
    assert torch.equal(x_adv, x)
