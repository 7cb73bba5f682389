"""The evaluation protocol: stratified subsets, figures on the same images, AutoAttack for any class
count, one validated protocol apart from the threat model."""

import pytest
import torch
from digits_models import one_thread
from torch import nn

from s2ap_lightning.attacks import ThreatModel
from s2ap_lightning.data.subsets import class_counts, stratified_indices
from s2ap_lightning.evaluation import EvalProtocol, autoattack_plan, evaluate, summarise


def test_stratified_subset_is_seeded_and_proportional():
    # Sorted by class, as image folders are: "the first 100" would be class 0 only.
    labels = torch.arange(10).repeat_interleave(100)
    a = stratified_indices(labels, 100, seed=3)
    assert torch.equal(a, stratified_indices(labels, 100, seed=3))
    assert not torch.equal(a, stratified_indices(labels, 100, seed=4))
    assert class_counts(labels[a]) == {c: 10 for c in range(10)}
    # Unequal classes: largest remainder, total exact, every class present.
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    b = stratified_indices(labels, 7, seed=0)
    assert len(b) == 7 and len(set(b.tolist())) == 7
    assert class_counts(labels[b]) == {0: 4, 1: 2, 2: 1}
    assert torch.equal(stratified_indices(labels, 500, seed=0), torch.arange(100))


def test_summarise_figures_rest_on_the_same_images():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    flags = {
        "clean": torch.tensor([1, 1, 1, 0, 1, 1]).bool(),
        "pgd": torch.tensor([1, 0, 1, 0, 0, 1]).bool(),
        "pgd_fewer": torch.tensor([1, 0, 1, 0, 1, 1]).bool(),
        "eps0": torch.tensor([1, 1, 1, 0, 1, 1]).bool(),
        "zero_grad": torch.zeros(6, dtype=torch.bool),
        "aa": torch.tensor([0, 0, 1, 0, 0, 0]).bool(),
        "in_aa": torch.tensor([1, 0, 1, 0, 0, 1]).bool(),
    }
    threat = ThreatModel(0.1, 0.02)
    rec = summarise(flags, labels, threat, EvalProtocol(aa_images=3), autoattack_plan(3))
    assert rec.clean_acc == pytest.approx(5 / 6) and rec.pgd_acc == pytest.approx(3 / 6)
    assert rec.aa_acc == pytest.approx(1 / 3) and rec.aa_subset_pgd_acc == pytest.approx(1.0)
    assert rec.aa_class_counts == {0: 1, 1: 1, 2: 1} and rec.n_aa_images == 3
    assert rec.passed and rec.majority_class_rate == pytest.approx(1 / 3) and not rec.collapsed
    # What was attacked with and how, apart: the final PGD's steps are the protocol's.
    assert rec.threat_model == {
        "eps": 0.1,
        "step_size": 0.02,
        "steps": 50,
        "norm": "linf",
        "random_start": True,
    }
    assert rec.protocol["aa_images"] == 3 and "eps" not in rec.protocol
    with pytest.raises(ValueError, match="lack zero_grad"):
        summarise({k: v for k, v in flags.items() if k != "zero_grad"}, labels, threat, EvalProtocol())


@pytest.mark.parametrize(
    ("classes", "runs", "skipped", "targets"),
    [
        (2, ["apgd-ce", "fab-t", "square"], {"apgd-t"}, 1),
        (3, ["apgd-ce", "fab-t", "square"], {"apgd-t"}, 2),
        (4, ["apgd-ce", "apgd-t", "fab-t", "square"], set(), 3),
        (10, ["apgd-ce", "apgd-t", "fab-t", "square"], set(), 9),
    ],
)
def test_autoattack_plan_per_class_count(classes, runs, skipped, targets):
    plan = autoattack_plan(classes, "standard")
    assert plan.attacks == runs and set(plan.skipped) == skipped and plan.n_target_classes == targets
    assert ("skipped apgd-t" in plan.describe()) == bool(skipped)


class _Linear(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("classes", [2, 3])
def test_autoattack_runs_on_few_classes(classes):
    with one_thread():
        _autoattack_runs_on_few_classes(classes)


def _autoattack_runs_on_few_classes(classes):
    torch.manual_seed(1)
    model = _Linear(classes).eval()
    x = torch.rand(24, 1, 2, 2)
    y = model(x).argmax(1)  # all clean-correct, so the attacks have work to do
    protocol = EvalProtocol(pgd_steps=5, aa_images=12)
    rec = evaluate(model, (x, y), ThreatModel(eps=0.05, step_size=0.02), protocol)
    assert rec.n_aa_images == 12 and rec.clean_acc == 1.0
    assert rec.aa_acc is not None and rec.aa_acc <= rec.aa_subset_clean_acc
    assert "apgd-t" in rec.autoattack_skipped and "fab-t" in rec.autoattack
    assert rec.checks["eps0_equals_clean"]["passed"]


class _Items(torch.utils.data.Dataset):
    """A map-style dataset of (x, y, index) whose loading draws random numbers (as transforms may)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        torch.rand(3)  # must not shift the attacks' random starts
        return self.x[i], int(self.y[i]), i


def test_dataset_and_tensors_give_the_same_record_and_leave_the_rng_alone():
    torch.manual_seed(1)
    model = _Linear(3).eval()
    x = torch.rand(40, 1, 2, 2)
    y = model(x).argmax(1)
    y[:5] = (y[:5] + 1) % 3  # some clean mistakes
    threat, protocol = (
        ThreatModel(eps=0.1, step_size=0.05),
        EvalProtocol(pgd_steps=4, batch_size=16, aa_images=0),
    )
    state = torch.get_rng_state()
    a = evaluate(model, (x, y), threat, protocol)
    assert torch.equal(torch.get_rng_state(), state), "the caller's random stream is untouched"
    b = evaluate(model, _Items(x, y), threat, protocol)
    assert a.as_dict() == b.as_dict()
    # Batching does not change the figures: one attack stream, images in order.
    c = evaluate(model, (x, y), threat, EvalProtocol(pgd_steps=4, batch_size=40, aa_images=0))
    assert c.clean_acc == a.clean_acc and c.eps0_acc == a.eps0_acc
    with pytest.raises(TypeError, match="pair of tensors or a map-style Dataset"):
        evaluate(model, x, threat, protocol)
    with pytest.raises(ValueError, match="40 images but 39 labels"):
        evaluate(model, (x, y[:-1]), threat, protocol)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pgd_steps": 0}, r"pgd_steps=0 is out of range: valid range is \[1, inf\)"),
        ({"pgd_restarts": 0}, r"pgd_restarts=0 is out of range"),
        ({"aa_images": -1}, r"aa_images=-1 is out of range: valid range is \[0, inf\)"),
        ({"aa_batch_size": 0}, r"aa_batch_size=0 is out of range"),
        ({"batch_size": 2.5}, r"batch_size=2.5 must be an integer"),
        ({"seed": -1}, r"seed=-1 is out of range"),
        ({"aa_version": "fast"}, r"aa_version='fast' is unknown; valid: standard, plus, rand"),
        ({"check_level": 0.0}, r"check_level=0.0 is out of range: valid range is \(0.0, 1.0\)"),
        ({"check_min_effect": 1.0}, r"check_min_effect=1.0 is out of range: valid range is \[0.0, 1.0\)"),
        ({"collapse_margin": -0.1}, r"collapse_margin=-0.1 is out of range: valid range is \[0.0, 1.0\]"),
    ],
)
def test_bad_protocol_fails_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalProtocol(**kwargs)


def test_protocol_defaults_and_weaker_pgd():
    p = EvalProtocol()
    assert (p.pgd_steps, p.fewer_pgd_steps, p.aa_images, p.seed) == (50, 10, 1000, 0)
    assert EvalProtocol(pgd_steps=6).fewer_pgd_steps == 3 and EvalProtocol(pgd_steps=1).fewer_pgd_steps == 1
