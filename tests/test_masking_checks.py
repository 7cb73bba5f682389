"""Gradient-masking checks with a noise model (issue 20): paired comparisons on the same images,
judged by an exact one-sided binomial test and a minimum effect; a trained digits MLP that passes
them, the same MLP with its gradients broken in three ways that fail them, and a collapsed model."""

import logging

import pytest
import torch
from digits_models import THREAT, Constant, Noisy, Quantised, Saturated, held_out, one_thread, trained_mlp

from s2ap_lightning.evaluation import (
    EvalProtocol,
    binomial_p_value,
    evaluate,
    evaluate_batch,
    gradient_masking_checks,
    not_more_accurate,
)

PGD_ONLY = EvalProtocol(pgd_steps=20, aa_images=0)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _flags(n, **overrides):
    flags = {k: torch.zeros(n, dtype=torch.bool) for k in ("pgd", "pgd_fewer", "zero_grad", "aa", "in_aa")}
    flags["clean"] = flags["eps0"] = torch.ones(n, dtype=torch.bool)
    flags.update(overrides)
    return flags


def _discordant(n, a_only, b_only, both=0):
    """Flags of ``n`` images: ``a_only`` right only under a, ``b_only`` only under b, ``both`` under both."""
    a, b = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    a[:a_only] = True
    b[a_only : a_only + b_only] = True
    a[a_only + b_only : a_only + b_only + both] = b[a_only + b_only : a_only + b_only + both] = True
    return a, b


def test_p_value_is_the_exact_one_sided_binomial():
    from scipy.stats import binomtest

    for a_only, b_only in [(0, 0), (2, 0), (7, 0), (6, 1), (30, 10), (3, 9)]:
        expected = binomtest(a_only, a_only + b_only, 0.5, alternative="greater").pvalue if a_only else 1.0
        assert binomial_p_value(a_only, b_only) == pytest.approx(expected, rel=1e-9)


def test_noise_of_a_few_images_passes_and_a_real_gap_fails():
    # The case: PGD-20 0.4150 vs PGD-10 0.4095 on 359 images is two images in one direction.
    pgd, fewer = _discordant(359, 2, 0, both=147)
    check = not_more_accurate(pgd, fewer, "pgd", "pgd_fewer")
    assert check["passed"] and (check["a_only"], check["b_only"]) == (2, 0)
    assert check["p_value"] == pytest.approx(0.25) and check["effect"] == pytest.approx(2 / 359)
    # Gradient masking: more steps "help" the model on 50 of 1,000 images, and hurt it on none.
    pgd, fewer = _discordant(1000, 50, 0, both=228)
    assert not not_more_accurate(pgd, fewer, "pgd", "pgd_fewer")["passed"]
    # Significant but below half a point on 10,000 images: not a conclusion-changing difference.
    pgd, fewer = _discordant(10_000, 40, 10, both=4000)
    check = not_more_accurate(pgd, fewer, "pgd", "pgd_fewer")
    assert check["p_value"] < 1e-4 and check["effect"] < 0.005 and check["passed"]
    # Large but not significant: four images one way, on a sample of 100.
    pgd, fewer = _discordant(100, 5, 1, both=30)
    check = not_more_accurate(pgd, fewer, "pgd", "pgd_fewer")
    assert check["effect"] >= 0.005 and check["p_value"] > 0.01 and check["passed"]


def _autoattack_messages(square_drop: float, zero_grad_points: int, randomised: bool) -> list[str]:
    """The warnings pyautoattack itself emits (its checks module), collected from its logger."""
    from pyautoattack import checks

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("test-autoattack-messages")
    logger.addHandler(Collect(logging.WARNING))
    try:
        checks.check_square_sr({"clean": 0.9, "apgd-ce": 0.5, "square": 0.5 - square_drop}, logger=logger)
        grad = torch.ones(20, 3)
        grad[:zero_grad_points] = 0
        checks.check_zero_gradients(grad, logger=logger)
        if randomised:
            checks.check_randomized(
                lambda x: torch.randn(len(x), 3), torch.rand(4, 3), torch.zeros(4).long(), logger=logger
            )
    finally:
        logger.handlers.clear()
    return records


def test_autoattack_warnings_with_a_count_are_judged_by_the_same_rule():
    in_aa = torch.ones(100, dtype=torch.bool)
    # Square found one image more than the gradient attacks on a 100-image sample: noise, passes.
    messages = _autoattack_messages(square_drop=0.01, zero_grad_points=0, randomised=False)
    assert len(messages) == 1 and "Square" in messages[0]
    checks = gradient_masking_checks(_flags(100, in_aa=in_aa), messages)
    assert checks["autoattack_square"]["passed"] and checks["autoattack_square"]["a_only"] == 1
    assert checks["autoattack_warnings"]["passed"]
    # Twelve images that only Square fooled, and twelve points with a zero gradient: masking.
    messages = _autoattack_messages(square_drop=0.12, zero_grad_points=12, randomised=False)
    checks = gradient_masking_checks(_flags(100, in_aa=in_aa), messages)
    assert not checks["autoattack_square"]["passed"] and checks["autoattack_square"]["a_only"] == 12
    assert not checks["autoattack_zero_gradients"]["passed"]
    assert checks["autoattack_zero_gradients"]["a_only"] == 12
    # A randomised model has no count: it fails as it stands.
    messages = _autoattack_messages(square_drop=0.0, zero_grad_points=0, randomised=True)
    checks = gradient_masking_checks(_flags(100, in_aa=in_aa), messages)
    assert (
        not checks["autoattack_warnings"]["passed"]
        and "randomized" in checks["autoattack_warnings"]["detail"]
    )


def test_two_pgd_attacks_with_different_random_starts_agree_on_a_healthy_model():
    model = trained_mlp()
    x, y = held_out()
    runs = []
    # PGD-5: short enough that the random start decides some images. PGD-20 converges to the same
    # outcome from every start on some machines' numerics, which would leave nothing to judge.
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        runs.append(evaluate_batch(model, x, y, THREAT, EvalProtocol(pgd_steps=5, aa_images=0))["pgd"])
    checks = [
        not_more_accurate(runs[a], runs[b], f"seed {a}", f"seed {b}")
        for a in range(3)
        for b in range(3)
        if a != b
    ]
    assert sum(c["a_only"] for c in checks) > 0, "the random starts do change some images"
    assert all(c["passed"] for c in checks), [c for c in checks if not c["passed"]]
    # And the whole evaluation of the healthy model, AutoAttack on a sample included, passes.
    rec = evaluate(model, held_out(), THREAT, EvalProtocol(pgd_steps=20, aa_images=40))
    assert rec.passed, rec.failures()
    assert rec.pgd_acc < rec.clean_acc - 0.1, "the attack has work to do: the checks are not vacuous"
    assert not rec.collapsed and rec.aa_acc is not None


@pytest.mark.parametrize(
    ("wrapper", "caught_by"),
    [(Saturated, "gradients_not_zero"), (Quantised, "gradients_not_zero"), (Noisy, "eps0_equals_clean")],
)
def test_broken_gradients_fail_a_check(wrapper, caught_by):
    healthy = evaluate(trained_mlp(), held_out(), THREAT, PGD_ONLY)
    rec = evaluate(wrapper(trained_mlp()), held_out(), THREAT, PGD_ONLY)
    assert not rec.collapsed
    assert rec.checks[caught_by]["verdict"] == "failed"
    assert any(f.startswith(caught_by) for f in rec.failures()) and rec.as_dict()["masking_suspected"]
    if wrapper is not Noisy:
        # Why the check is needed: PGD is stuck where it starts, the robust accuracy is inflated, and
        # the comparisons of attacks with each other do not see it.
        assert rec.pgd_acc > healthy.pgd_acc + 0.1
        assert rec.checks["more_steps_not_higher"]["passed"] and rec.checks["pgd_at_most_clean"]["passed"]


def test_collapsed_model_failures_are_not_called_masking():
    x, y = held_out()
    rec = evaluate(Constant(label=int(y[0])), (x, y), THREAT, PGD_ONLY)
    counts = torch.bincount(y)
    assert rec.majority_class_rate == pytest.approx(float(counts.max()) / len(y))
    assert rec.clean_acc == pytest.approx(float(counts[int(y[0])]) / len(y))
    assert rec.collapsed
    assert rec.checks["gradients_not_zero"]["verdict"] == "collapsed"  # the results are kept
    assert not rec.checks["gradients_not_zero"]["passed"] and not rec.passed
    assert rec.failures() == [] and rec.collapsed_failures()
    assert not rec.as_dict()["masking_suspected"]
    # A margin of 0 still calls a constant answer collapsed, when it scores at most the majority rate.
    tight = evaluate(
        Constant(label=int(y[0])), (x, y), THREAT, EvalProtocol(aa_images=0, collapse_margin=0.0)
    )
    assert tight.collapsed
