"""Gradient-masking checks with a noise model: paired comparisons judged on their discordant images.

Two attacks with random starts, run on the same images of a healthy model, disagree on a few images
in both directions; an evaluation that masks gradients makes the attack that should be stronger lose
on many images, in one direction. So every comparison here is paired, on the SAME images, and looks
only at the discordant ones: ``a_only`` images that the side which must not be more accurate (``a``)
gets right and ``b`` wrong, and ``b_only`` the reverse. Without masking, each discordant image is as
likely to fall either way, so ``a_only`` is at most ``Binomial(a_only + b_only, 1/2)``; the check is
McNemar's exact one-sided test of that. A check fails only when BOTH

* the test rejects it (p-value below ``level``): the difference is not the noise of random starts; and
* the effect, ``(a_only - b_only) / n`` (the accuracy difference, as a fraction of the ``n`` images
  compared), is at least ``min_effect``: on 10,000 images a difference of three images can be
  "significant" without changing any conclusion a robustness table supports.

Defaults (:class:`~s2ap_lightning.evaluation.protocol.EvalProtocol`): ``check_level`` 0.01 and
``check_min_effect`` 0.005. An evaluation runs about six checks, so at level 0.01 a healthy model
fails any of them with probability at most about 6 %, and less in practice, since the stronger attack
of each pair really is stronger (the test is one-sided against it) and the exact binomial test is
conservative. Gradient masking is not subtle: it moves figures by several points, i.e. dozens of
discordant images in one direction on 1,000 images, with p-values far below 0.01, so a stricter level
would cost little power; a looser one would call two images of noise masking on small samples (the
issue's PGD-20 0.4150 vs PGD-10 0.4095 on 359 images is two images: p = 0.25, passes). Half a point
is the smallest difference robustness tables treat as real (pruning papers compare methods that
differ by one point or more, and random restarts alone move PGD by a few tenths of a point); with
all discordant images in one direction, level 0.01 alone needs 7 images, so on samples under 1,400
images the level decides and on larger ones the effect does.

Counts that are not comparisons of two attacks are judged by the same rule, as one-sided discordant
counts (``b_only = 0``): images whose loss gradient is exactly zero (PGD cannot move from them), and
AutoAttack's own warnings that carry a count (Square lowering the robust accuracy after the gradient
attacks, which means those attacks missed images a black-box attack found; zero gradients of the DLR
loss). AutoAttack's warnings without a count (a randomised model, probabilities instead of logits, a
dynamic defence, too many target classes) are failures as they stand.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

#: Per-image flags an evaluation records, each a boolean tensor over the evaluated images: correct
#: clean, under the final PGD, under the weaker PGD, under PGD at eps 0, whether the cross-entropy
#: gradient at the clean image is exactly zero, correct under AutoAttack, in the AutoAttack sample.
FLAGS = ("clean", "pgd", "pgd_fewer", "eps0", "zero_grad", "aa", "in_aa")

#: Verdicts of a check: passed; failed (gradient masking or a broken evaluation); failed on a model
#: that does no better than always answering its most common class (see ``EvalRecord.collapsed``).
VERDICTS = ("passed", "failed", "collapsed")

_SQUARE = re.compile(r"Square Attack has decreased the robust accuracy of\s*([0-9.]+)\s*%")
# AutoAttack formats a tensor: "there are tensor(12) points ..." or "tensor(12, device='cuda:0')".
_ZERO_GRAD = re.compile(r"there are\s+(?:tensor\()?(\d+).*?points with zero gradient")


def binomial_p_value(a_only: int, b_only: int) -> float:
    """Exact one-sided McNemar p-value: P(X >= a_only) for X ~ Binomial(a_only + b_only, 1/2)."""
    from scipy.stats import binom  # scipy loads slowly; only summaries need it

    discordant = a_only + b_only
    if a_only <= 0:
        return 1.0
    return float(binom.sf(a_only - 1, discordant, 0.5))


def judge(a_only: int, b_only: int, n: int, level: float, min_effect: float) -> dict[str, Any]:
    """The rule every paired check follows: fail only when significant AND large enough.

    Args:
        a_only: discordant images pointing to a problem (``a`` right, ``b`` wrong).
        b_only: discordant images pointing the expected way.
        n: images compared (the effect's denominator).
        level: the one-sided test's level.
        min_effect: smallest accuracy difference (fraction of ``n``) that can fail.

    """
    p_value = binomial_p_value(a_only, b_only)
    effect = (a_only - b_only) / max(n, 1)
    passed = not (p_value < level and effect >= min_effect)
    return {
        "passed": passed,
        "n": n,
        "a_only": a_only,
        "b_only": b_only,
        "p_value": p_value,
        "effect": effect,
    }


def _rule(level: float, min_effect: float) -> str:
    return f"fails at p < {level:g} and effect >= {100 * min_effect:.2f} points"


def not_more_accurate(
    a: Tensor,
    b: Tensor,
    a_name: str,
    b_name: str,
    level: float = 0.01,
    min_effect: float = 0.005,
) -> dict[str, Any]:
    """The check that ``a`` (e.g. the stronger attack's flags) is not more accurate than ``b``.

    ``a`` and ``b`` are per-image correctness flags of the same images, in the same order.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"{a_name} and {b_name} flags cover different images: {tuple(a.shape)} vs {tuple(b.shape)}"
        )
    a, b = a.bool().cpu(), b.bool().cpu()
    n = len(a)
    out = judge(int((a & ~b).sum()), int((b & ~a).sum()), n, level, min_effect)
    acc_a = float(a.double().mean()) if n else float("nan")
    acc_b = float(b.double().mean()) if n else float("nan")
    out["detail"] = (
        f"{a_name} {acc_a:.4f} vs {b_name} {acc_b:.4f} on {n} images: {out['a_only']} right only under "
        f"{a_name}, {out['b_only']} only under {b_name} (one-sided binomial p={out['p_value']:.3g}, "
        f"effect {100 * out['effect']:+.2f} points; {_rule(level, min_effect)})"
    )
    return {"a": a_name, "b": b_name, **out}


def count_check(
    count: int, n: int, what: str, level: float = 0.01, min_effect: float = 0.005
) -> dict[str, Any]:
    """A count of images that all point to a problem (``b_only = 0``), judged by :func:`judge`."""
    out = judge(count, 0, n, level, min_effect)
    out["detail"] = (
        f"{count} of {n} images {what} (p={out['p_value']:.3g}, effect {100 * out['effect']:.2f} points; "
        f"{_rule(level, min_effect)})"
    )
    return {"a": None, "b": None, **out}


def equal_check(a: Tensor, b: Tensor, a_name: str, b_name: str) -> dict[str, Any]:
    """Exact per-image equality: for deterministic comparisons (an eps-0 attack cannot change anything)."""
    a, b = a.bool().cpu(), b.bool().cpu()
    a_only, b_only, n = int((a & ~b).sum()), int((b & ~a).sum()), len(a)
    return {
        "a": a_name,
        "b": b_name,
        "passed": a_only == b_only == 0,
        "n": n,
        "a_only": a_only,
        "b_only": b_only,
        "p_value": None,
        "effect": (a_only - b_only) / max(n, 1),
        "detail": (
            f"{a_name} {float(a.double().mean()):.4f} vs {b_name} {float(b.double().mean()):.4f} on {n} "
            f"images: {a_only} right only under {a_name}, {b_only} only under {b_name} (must be identical: "
            "an attack with budget 0 returns the clean image, so any difference is a model whose output "
            "changes between two calls on the same input, i.e. randomness)"
        ),
    }


def autoattack_counts(warnings: Iterable[str], n_aa: int) -> tuple[dict[str, int], list[str]]:
    """AutoAttack's warnings split into counted ones (images, by kind) and the rest.

    Square's "decreased the robust accuracy of X%" is X% of the sample AutoAttack ran on (one call on
    the whole sample here). The zero-gradient warning is raised per batch and per attack run; the
    largest count is kept (a lower bound on the images concerned).
    """
    counts: dict[str, int] = {}
    other: list[str] = []
    for message in warnings:
        square, zero = _SQUARE.search(message), _ZERO_GRAD.search(message)
        if square:
            images = round(float(square.group(1)) / 100 * n_aa)
            counts["square"] = max(counts.get("square", 0), images)
        elif zero:
            counts["zero_gradients"] = max(counts.get("zero_gradients", 0), int(zero.group(1)))
        else:
            other.append(message)
    return counts, other


def gradient_masking_checks(
    flags: Mapping[str, Tensor],
    aa_warnings: Iterable[str] = (),
    level: float = 0.01,
    min_effect: float = 0.005,
) -> dict[str, dict[str, Any]]:
    """Every check of an evaluation, from its per-image flags (:data:`FLAGS`) and AutoAttack's warnings.

    On all evaluated images: the final PGD is not more accurate than clean; PGD at eps 0 gives exactly
    the clean predictions; the final PGD is not more accurate than the weaker one (more steps must not
    help the model); the cross-entropy gradient is not exactly zero at the clean images (PGD steps by
    its sign, so such images stay where the attack starts: saturated logits, quantised inputs). On
    the AutoAttack sample: AutoAttack is not more accurate than PGD nor than clean there, and
    AutoAttack's warnings (see the module's docstring).
    """
    missing = [k for k in FLAGS if k not in flags]
    if missing:
        raise ValueError(f"flags lack {', '.join(missing)}; an evaluation records all of {', '.join(FLAGS)}")
    f = {k: v.detach().cpu().bool() for k, v in flags.items()}
    n = len(f["clean"])
    checks = {
        "pgd_at_most_clean": not_more_accurate(f["pgd"], f["clean"], "pgd", "clean", level, min_effect),
        "eps0_equals_clean": equal_check(f["eps0"], f["clean"], "eps0", "clean"),
        "more_steps_not_higher": not_more_accurate(
            f["pgd"], f["pgd_fewer"], "pgd", "pgd_fewer", level, min_effect
        ),
        "gradients_not_zero": count_check(
            int(f["zero_grad"].sum()), n, "have an exactly zero cross-entropy gradient", level, min_effect
        ),
    }
    in_aa = f["in_aa"]
    n_aa = int(in_aa.sum())
    if n_aa:
        aa, pgd, clean = f["aa"][in_aa], f["pgd"][in_aa], f["clean"][in_aa]
        checks["aa_at_most_pgd"] = not_more_accurate(aa, pgd, "aa", "pgd", level, min_effect)
        checks["aa_at_most_clean"] = not_more_accurate(aa, clean, "aa", "clean", level, min_effect)
        warnings = list(dict.fromkeys(aa_warnings))
        counts, other = autoattack_counts(warnings, n_aa)
        if "square" in counts:
            checks["autoattack_square"] = count_check(
                counts["square"], n_aa, "fooled by Square only, after the gradient attacks", level, min_effect
            )
        if "zero_gradients" in counts:
            checks["autoattack_zero_gradients"] = count_check(
                counts["zero_gradients"],
                n_aa,
                "with a zero DLR-loss gradient (AutoAttack)",
                level,
                min_effect,
            )
        checks["autoattack_warnings"] = {
            "a": None,
            "b": None,
            "passed": not other,
            "n": n_aa,
            "a_only": None,
            "b_only": None,
            "p_value": None,
            "effect": None,
            "detail": "; ".join(other) if other else "no warning without a count",
        }
    return checks
