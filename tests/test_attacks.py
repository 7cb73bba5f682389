import warnings

import pytest
import torch
import torch.nn.functional as F

from s2ap_lightning.attacks import AttackConfig, ThreatModel, attack_context, build_robust_loss, pgd, pgd_ce
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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"norm": "l1"}, r"attack norm='l1' is unknown; valid: linf, l2"),
        ({"eps": -0.1}, r"attack eps=-0.1 is out of range: valid range is \[0.0, 1.0\]"),
        ({"eps": 2.0}, r"attack eps=2.0 is out of range: valid range is \[0.0, 1.0\]"),
        ({"eps": float("nan")}, r"attack eps=nan is out of range"),
        (
            {"step_size": 1.5, "eps": 1.0},
            r"attack step_size=1.5 is out of range: valid range is \[0.0, 1.0\]",
        ),
        ({"steps": 0}, r"attack steps=0 is out of range: valid range is \[1, inf\)"),
        ({"steps": 2.5}, r"attack steps=2.5 must be an integer"),
        ({"eps": "0.1"}, r"attack eps='0.1' must be a number"),
    ],
)
def test_threat_model_fails_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ThreatModel(**kwargs)


def test_threat_model_is_the_attack_config():
    assert AttackConfig is ThreatModel
    t = ThreatModel()
    assert (t.eps, t.step_size, t.steps, t.norm, t.random_start) == (8 / 255, 2 / 255, 10, "linf", True)
    # The former positional order still means (eps, step_size, steps, norm).
    assert ThreatModel(0.1, 0.025, 10, "l2") == ThreatModel(eps=0.1, step_size=0.025, steps=10, norm="l2")
    assert ThreatModel(eps=3.0, step_size=2.0, norm="l2").eps == 3.0, "L2 budgets are not capped at 1"
    assert ThreatModel(0.1, 0.025).describe() == "linf eps 0.1, PGD-10 step 0.025"
    assert ThreatModel(0.1, 0.025).with_steps(50).describe() == "linf eps 0.1, PGD-50 step 0.025"
    assert ThreatModel(0.1, 0.025).with_eps(0.0).eps == 0.0


def test_step_larger_than_eps_warns_once():
    with pytest.warns(UserWarning, match=r"step_size=0.2 is larger than eps=0.1"):
        threat = ThreatModel(0.1, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        threat.with_steps(50)  # already said when it was made
        ThreatModel(0.1, 0.2, norm="l2")  # an L2 step may exceed the budget's corners
        ThreatModel(0.0, 0.2)  # eps 0: nothing to jump to


def test_pgd_zero_eps_returns_input(model_and_batch):
    model, x, y = model_and_batch
    with attack_context(model):
        x_adv = pgd(model, x, lambda z: F.cross_entropy(z, y), AttackConfig(0.0, 0.01, 3))
    assert torch.equal(x_adv, x)
