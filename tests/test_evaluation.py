"""The evaluation protocol: stratified subsets, same-image checks with a noise tolerance, AutoAttack
for any class count."""

import pytest
import torch
from torch import nn

from s2ap_lightning.data.subsets import class_counts, stratified_indices
from s2ap_lightning.evaluation import (
    EvalProtocol,
    autoattack_plan,
    evaluate,
    gradient_masking_checks,
    summarise,
)


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


def _figures(clean, pgd, fewer, eps0=None, aa=None, aa_clean=None, aa_pgd=None):
    return {
        "clean_acc": clean,
        "pgd_acc": pgd,
        "pgd_fewer_acc": fewer,
        "eps0_acc": clean if eps0 is None else eps0,
        "aa_acc": aa,
        "aa_subset_clean_acc": aa_clean,
        "aa_subset_pgd_acc": aa_pgd,
    }


def test_one_image_of_noise_passes_a_real_masking_case_fails():
    # The case: PGD-10 0.228, PGD-50 0.229 on 1,000 images (one image) is noise.
    ok = gradient_masking_checks(_figures(0.5, 0.229, 0.228), n_images=1000)
    assert all(c["passed"] for c in ok.values())
    # Gradient masking: more steps "help" the model by 5 points.
    bad = gradient_masking_checks(_figures(0.5, 0.28, 0.228), n_images=1000)
    assert not bad["more_steps_not_higher"]["passed"]


def test_autoattack_is_compared_with_pgd_on_its_own_images():
    # The case: AutoAttack 0.46 above PGD 0.23 on the same images must fail.
    figures = _figures(0.34, 0.23, 0.23, aa=0.46, aa_clean=0.50, aa_pgd=0.23)
    checks = gradient_masking_checks(figures, n_images=1000, n_aa_images=100)
    assert not checks["aa_at_most_pgd"]["passed"]
    assert checks["aa_at_most_clean"]["passed"]
    figures = _figures(0.34, 0.23, 0.23, aa=0.22, aa_clean=0.35, aa_pgd=0.23)
    checks = gradient_masking_checks(figures, 1000, 100, ["Square decreased the accuracy"])
    assert checks["aa_at_most_pgd"]["passed"] and not checks["autoattack_warnings"]["passed"]


def test_summarise_figures_rest_on_the_same_images():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    flags = {
        "clean": torch.tensor([1, 1, 1, 0, 1, 1]).bool(),
        "pgd": torch.tensor([1, 0, 1, 0, 0, 1]).bool(),
        "pgd_fewer": torch.tensor([1, 0, 1, 0, 1, 1]).bool(),
        "eps0": torch.tensor([1, 1, 1, 0, 1, 1]).bool(),
        "aa": torch.tensor([0, 0, 1, 0, 0, 0]).bool(),
        "in_aa": torch.tensor([1, 0, 1, 0, 0, 1]).bool(),
    }
    rec = summarise(flags, labels, EvalProtocol(0.1, 0.02, aa_images=3), autoattack_plan(3))
    assert rec.clean_acc == pytest.approx(5 / 6) and rec.pgd_acc == pytest.approx(3 / 6)
    assert rec.aa_acc == pytest.approx(1 / 3) and rec.aa_subset_pgd_acc == pytest.approx(1.0)
    assert rec.aa_class_counts == {0: 1, 1: 1, 2: 1} and rec.n_aa_images == 3
    assert rec.passed


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
    torch.manual_seed(1)
    model = _Linear(classes).eval()
    x = torch.rand(24, 1, 2, 2)
    y = model(x).argmax(1)  # all clean-correct, so the attacks have work to do
    protocol = EvalProtocol(eps=0.05, step_size=0.02, pgd_steps=5, aa_images=12)
    rec = evaluate(model, x, y, protocol)
    assert rec.n_aa_images == 12 and rec.clean_acc == 1.0
    assert rec.aa_acc is not None and rec.aa_acc <= rec.aa_subset_clean_acc
    assert "apgd-t" in rec.autoattack_skipped and "fab-t" in rec.autoattack
    assert rec.checks["eps0_equals_clean"]["passed"]
