"""``study.csv``, ``study.md`` and plots of a finished study: means with 95 % CIs, paired differences.

Confidence intervals are Student-t intervals over seeds (``mean +- t_{0.975, n-1} * sd / sqrt(n)``).
The S2AP-minus-base difference is paired by seed: both come from the same pretrained model, data
order and finetuning recipe, so the seed-to-seed spread cancels out of the difference.
"""

from __future__ import annotations

import math
from pathlib import Path

from s2ap_lightning.analysis.report import ResultRow, write_report, write_results_csv
from s2ap_lightning.jobs.cells import StudySpec, study_rows


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval (``nan`` with one value)."""
    from scipy import stats  # scipy loads slowly; only the study report needs it

    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


#: Fewest seeds for which ``study.md`` prints a confidence interval. With two seeds the t quantile is
#: t_{0.975, 1} = 12.7, so ordinary seed noise of a few points becomes an interval of hundreds of points
#: (issue 19): it reads like a measurement but says nothing, so the mean is printed with the reason instead.
MIN_SEEDS_FOR_INTERVAL = 3


def interval_missing(n: int, half: float) -> str | None:
    """Why an interval over ``n`` seeds with half-width ``half`` (a fraction) is not worth printing.

    None when it is. Besides too few seeds, an interval wider than the whole accuracy scale (0 to 100
    points) is refused too: it would contain every possible value, however many seeds produced it.
    """
    if n < MIN_SEEDS_FOR_INTERVAL:
        return f"{n} seed{'' if n == 1 else 's'}: too few for an interval"
    if math.isnan(half) or 2 * half > 1.0:
        return f"{n} seeds: interval wider than the accuracy range"
    return None


def interval_text(values: list[float], signed: bool = False) -> str:
    """``mean ± 95 % half-width`` in points, or the mean and ``± n/a (why)`` (see :func:`interval_missing`).

    Args:
        values: one accuracy (or paired difference) per seed, as fractions.
        signed: print the mean with its sign (paired differences).

    """
    mean, half = mean_ci(values)
    if math.isnan(mean):
        return "n/a"
    shown = f"{100 * mean:+.1f}" if signed else f"{100 * mean:.1f}"
    why = interval_missing(len(values), half)
    return f"{shown} ± n/a ({why})" if why else f"{shown} ± {100 * half:.1f}"


def _pct(values: list[float]) -> str:
    return interval_text(values)


def paired(rows: list[ResultRow], base: str, sparsity: float, metric: str) -> dict[int, tuple[float, float]]:
    """``{seed: (base value, S2AP value)}`` of the finetuned, selected models."""
    out: dict[int, list[float | None]] = {}
    for r in rows:
        value = getattr(r, metric)
        if r.selected and r.base_method == base and r.sparsity == sparsity and value is not None:
            slot = 1 if r.variant == "s2ap" else 0
            out.setdefault(r.seed, [None, None])[slot] = value
    return {s: (v[0], v[1]) for s, v in out.items() if None not in v}


def verdict(diff_mean: float, diff_half: float, n: int | None = None) -> str:
    """Plain reading of a paired CI: better, worse, or no detectable difference.

    With ``n`` (the number of seeds) given, an interval :func:`interval_missing` refuses yields no
    reading either: "no detectable difference" from two seeds would sound like evidence of absence.
    """
    if n is not None and interval_missing(n, diff_half):
        return "too few seeds to tell" if n < MIN_SEEDS_FOR_INTERVAL else "interval too wide to tell"
    if math.isnan(diff_half):
        return "one seed: no interval"
    if diff_mean - diff_half > 0:
        return "S2AP better"
    if diff_mean + diff_half < 0:
        return "S2AP worse"
    return "no detectable difference"


def write_study_report(spec: StudySpec) -> Path:
    """Write ``study.csv``, ``study.md`` and plots of a finished study into its folder; return ``study.md``.

    ``study.md`` is the shared report (:func:`~s2ap_lightning.analysis.report.write_report`) with the
    study's statistics as its sections: means with intervals over seeds, the paired differences, the
    validation accuracy of every gamma, the mask statistics.
    """
    folder = spec.folder
    rows = study_rows(spec)
    write_results_csv(rows, folder / "study.csv")
    finals = [r for r in rows if r.selected and r.evaluated]
    wall = sum(float(r.wall_s or 0) for r in rows)
    recipe = f"with AWP (gamma {spec.awp_gamma})" if spec.awp else "without AWP"
    intro = [
        f"Spec: `{folder / 'spec.yaml'}` (data `{spec.data_config}`); seeds {spec.seeds}; sparsities "
        f"{spec.sparsities}; gammas {spec.gammas}; epochs pretrain/search/finetune "
        f"{spec.pretrain_epochs}/{spec.prune_epochs}/{spec.finetune_epochs} (S2AP warm-up "
        f"{spec.warmup_epochs}); finetuning {recipe} for every method. Wall time of the cells, added "
        f"up: {wall / 60:.1f} min (`wall_s` per row in `study.csv`).",
        "Accuracies in %, mean ± 95 % CI half-width over seeds (Student t). Test figures: clean and "
        f"PGD-{spec.eval_pgd_steps} on every test image, AutoAttack on a class-stratified sample of "
        f"{spec.aa_images}. With fewer than {MIN_SEEDS_FOR_INTERVAL} seeds, or where an interval would be "
        "wider than the 0-100 accuracy scale, the mean stands alone with `± n/a` and the reason. The "
        "S2AP gamma of each (seed, sparsity) was chosen by the validation "
        f"PGD-{spec.select_pgd_steps} accuracy of the searched mask, before finetuning.",
    ]
    plots = _plots(spec, rows, finals, folder)
    figures = [
        ("Robust accuracy: mean and 95 % CI over seeds", plots[0].name),
        ("Paired per seed", plots[1].name),
    ]
    return write_report(
        folder,
        rows,
        name="study.md",
        title=f"Study `{spec.name}`",
        intro=intro,
        sections=summary_lines(spec, rows),
        figures=figures,
    )


def summary_lines(spec: StudySpec, rows: list[ResultRow]) -> list[str]:
    """The study's statistics as Markdown lines (the per-run tables follow them in ``study.md``).

    Accuracy per method with intervals over seeds, paired differences, gamma sensitivity, mask statistics.
    """
    finals = [r for r in rows if r.selected and r.evaluated]
    lines: list[str] = []
    failed = [r for r in finals if not r.checks_passed]
    if failed:
        lines += [
            f"**{len(failed)} evaluation(s) FAILED a gradient-masking check** (marked `!` below; "
            "details in `study.csv`).",
            "",
        ]
    lines += [
        "## Accuracy per method",
        "",
        "| method | sparsity | seeds | clean | PGD | AutoAttack | checks |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, float], list[ResultRow]] = {}
    for r in finals:
        groups.setdefault((r.method, r.sparsity), []).append(r)
    for (method, sp), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = [
            _pct([getattr(g, m) for g in group if getattr(g, m) is not None])
            for m in ("clean_acc", "pgd_acc", "aa_acc")
        ]
        bad = sum(1 for g in group if not g.checks_passed)
        status = "ok" if not bad else f"{bad} failed !"
        lines.append(f"| {method} | {sp:g} | {len(group)} | {' | '.join(cells)} | {status} |")
    lines += [
        "",
        "## Paired difference, S2AP minus base method (same seed)",
        "",
        "| base | sparsity | metric | per seed (points) | mean ± 95 % CI | S2AP wins | reading |",
        "|---|---|---|---|---|---|---|",
    ]
    for base in spec.base_methods:
        for sp in spec.sparsities:
            # Evaluations of this row that failed a masking check (the same for every metric).
            flagged = sum(
                1 for r in finals if r.base_method == base and r.sparsity == sp and not r.checks_passed
            )
            for metric in ("pgd_acc", "aa_acc", "clean_acc"):
                pairs = paired(rows, base, sp, metric)
                if not pairs:
                    continue
                diffs = [pairs[s][1] - pairs[s][0] for s in sorted(pairs)]
                m, h = mean_ci(diffs)
                wins = sum(d > 0 for d in diffs)
                per_seed = ", ".join(f"{100 * d:+.1f}" for d in diffs)
                reading = verdict(m, h, len(diffs))
                if flagged:
                    reading += f" ! ({flagged} of these evaluations failed a masking check)"
                lines.append(
                    f"| {base} | {sp:g} | {metric.replace('_acc', '')} | {per_seed} | "
                    f"{interval_text(diffs, signed=True)} | {wins}/{len(diffs)} | {reading} |"
                )
    lines += [
        "",
        "## Gamma sensitivity: validation PGD accuracy of the searched mask (before finetuning)",
        "",
        "| base | sparsity | gamma | "
        + " | ".join(f"seed {s}" for s in spec.seeds)
        + " | mean | chosen on |",
        "|---|---|---|" + "---|" * (len(spec.seeds) + 2),
    ]
    searches = [r for r in rows if r.variant != "dense"]
    for base in spec.base_methods:
        for sp in spec.sparsities:
            for g in [0.0, *spec.gammas]:
                vals, chosen = [], 0
                for s in spec.seeds:
                    r = next(
                        r
                        for r in searches
                        if (r.seed, r.base_method, r.sparsity, r.gamma or 0.0) == (s, base, sp, g)
                    )
                    vals.append(r.val_mask_pgd_acc)
                    chosen += r.selected and g > 0
                label = f"{g:g}" if g else "0 (base)"
                lines.append(
                    f"| {base} | {sp:g} | {label} | "
                    + " | ".join(f"{100 * v:.1f}" for v in vals)
                    + f" | {100 * sum(vals) / len(vals):.1f} | {chosen if g else '-'} |"
                )
    lines += [
        "",
        "## Mask statistics of the selected searches (mean over seeds)",
        "",
        "| method | sparsity | mask PGD (test, before finetuning) | Hamming, last epoch | lambda_max |",
        "|---|---|---|---|---|",
    ]
    for (method, sp), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if method == "dense":
            continue

        def avg(key: str, group: list[ResultRow] = group) -> str:
            vals = [getattr(g, key) for g in group if getattr(g, key) is not None]
            return f"{sum(vals) / len(vals):.4g}" if vals else "n/a"

        stats = " | ".join(avg(k) for k in ("mask_pgd_acc", "mask_hamming_last_epoch", "lambda_max"))
        lines.append(f"| {method} | {sp:g} | {stats} |")
    lines += [
        "",
        "The tables below list every finetuned and tested run; `study.csv` holds every search as well "
        "(`selected`: the one finetuned).",
    ]
    return lines


def _plots(spec: StudySpec, rows: list[ResultRow], finals: list[ResultRow], folder: Path) -> list[Path]:
    from s2ap_lightning.analysis.plotting import subplots

    out = []
    fig, axes = subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in zip(axes, ("pgd_acc", "aa_acc"), ("PGD", "AutoAttack"), strict=True):
        methods = sorted({r.method for r in finals if r.method != "dense"})
        for i, method in enumerate(methods):
            xs, ms, hs = [], [], []
            for sp in spec.sparsities:
                vals = [
                    getattr(r, metric)
                    for r in finals
                    if r.method == method and r.sparsity == sp and getattr(r, metric) is not None
                ]
                if vals:
                    m, h = mean_ci(vals)
                    xs.append(i * 0.15 + spec.sparsities.index(sp))
                    ms.append(100 * m)
                    hs.append(0 if interval_missing(len(vals), h) else 100 * h)  # no bar: as study.md
            ax.errorbar(xs, ms, yerr=hs, marker="o", capsize=4, label=method)
        dense = [getattr(r, metric) for r in finals if r.method == "dense" and getattr(r, metric) is not None]
        if dense:
            ax.axhline(100 * sum(dense) / len(dense), color="grey", ls="--", label="dense")
        ax.set_xticks(range(len(spec.sparsities)), [f"{s:g}" for s in spec.sparsities])
        ax.set_xlabel("sparsity")
        ax.set_ylabel(f"{title} accuracy (%)")
        ax.set_title(f"{title}: mean and 95 % CI over seeds")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.append(folder / "robust_vs_sparsity.png")
    fig.savefig(out[-1], dpi=100)

    pairs_cols = [(b, sp) for b in spec.base_methods for sp in spec.sparsities]
    fig, axes = subplots(1, len(pairs_cols), figsize=(4 * len(pairs_cols), 4), squeeze=False)
    for ax, (base, sp) in zip(axes[0], pairs_cols, strict=True):
        for seed, (a, b) in sorted(paired(rows, base, sp, "pgd_acc").items()):
            color = "tab:green" if b > a else "tab:red" if b < a else "tab:gray"  # S2AP ahead, behind, tied
            ax.plot([0, 1], [100 * a, 100 * b], marker="o", color=color, alpha=0.8)
            ax.annotate(f"seed {seed}", (1.02, 100 * b), fontsize=7)
        ax.set_xticks([0, 1], [base, f"{base}+s2ap"])
        ax.set_xlim(-0.2, 1.35)
        ax.set_ylabel("PGD accuracy (%)")
        ax.set_title(f"paired per seed, sparsity {sp:g}")
    fig.tight_layout()
    out.append(folder / "paired_per_seed.png")
    fig.savefig(out[-1], dpi=100)
    return out
