"""``study.csv``, ``study.md`` and plots of a finished study: means with 95 % CIs, paired differences.

Confidence intervals are Student-t intervals over seeds (``mean +- t_{0.975, n-1} * sd / sqrt(n)``).
The S2AP-minus-base difference is paired by seed: both come from the same pretrained model, data
order and finetuning recipe, so the seed-to-seed spread cancels out of the difference.
"""

from __future__ import annotations

import math
from pathlib import Path

from s2ap_lightning.analysis.report import ResultRow, write_report, write_results_csv
from s2ap_lightning.jobs.cells import StudySpec, cells_of, read_result, study_rows


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


#: What the report calls each finetuning arm.
ARM_TEXT = {"plain": "plain adversarial finetuning", "awp": "AWP finetuning"}


def pair_rows(
    rows: list[ResultRow], base: str, sparsity: float, arm: str | None = None
) -> dict[int, tuple[ResultRow, ResultRow]]:
    """``{seed: (base row, S2AP row)}`` of the finetuned, selected models of one finetuning arm.

    ``arm`` None takes every arm (a study of one arm, or rows that do not name theirs). Only seeds
    with both members finetuned form a pair.
    """
    out: dict[int, list[ResultRow | None]] = {}
    for r in rows:
        if r.selected and r.base_method == base and r.sparsity == sparsity and r.variant in ("base", "s2ap"):
            if arm is None or r.finetune == arm:
                out.setdefault(r.seed, [None, None])[1 if r.variant == "s2ap" else 0] = r
    return {s: (v[0], v[1]) for s, v in out.items() if v[0] is not None and v[1] is not None}


def paired(
    rows: list[ResultRow],
    base: str,
    sparsity: float,
    metric: str,
    arm: str | None = None,
    keep_collapsed: bool = False,
) -> dict[int, tuple[float, float]]:
    """``{seed: (base value, S2AP value)}`` of the finetuned, selected models.

    A pair with a collapsed member is left out unless ``keep_collapsed``: a model that answers one
    class says nothing about the mask it was finetuned from, and its difference to its partner would
    be the distance between a working model and a constant answer.
    """
    out = {}
    for seed, (b, s) in pair_rows(rows, base, sparsity, arm).items():
        if not keep_collapsed and (b.collapsed or s.collapsed):
            continue
        vb, vs = getattr(b, metric), getattr(s, metric)
        if vb is not None and vs is not None:
            out[seed] = (vb, vs)
    return out


def collapsed_pairs(rows: list[ResultRow], base: str, sparsity: float, arm: str | None = None) -> int:
    """How many pairs of one (base method, sparsity, arm) are left out because a member collapsed."""
    return sum(1 for b, s in pair_rows(rows, base, sparsity, arm).values() if b.collapsed or s.collapsed)


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


def collapsed_counts(
    rows: list[ResultRow], base: str, arm: str | None, sparsities: list[float]
) -> list[tuple[float, int, int]]:
    """``(sparsity, collapsed, models)`` of the base method's finetuned models, lowest sparsity first."""
    counts = []
    for sp in sorted(sparsities):
        group = _finals_of(rows, base, "base", sp, arm)
        if group:
            counts.append((sp, sum(1 for r in group if r.collapsed), len(group)))
    return counts


def collapse_point(
    rows: list[ResultRow], base: str, arm: str | None, sparsities: list[float]
) -> tuple[float, int, int] | None:
    """The lowest sparsity at which at least half of the base method's finetuned models collapsed.

    Returns ``(sparsity, collapsed, models)``, or None when no sparsity of the study reaches it.
    """
    return next((c for c in collapsed_counts(rows, base, arm, sparsities) if 2 * c[1] >= c[2]), None)


def _finals_of(
    rows: list[ResultRow], base: str, variant: str, sparsity: float, arm: str | None
) -> list[ResultRow]:
    return [
        r
        for r in rows
        if r.selected
        and r.evaluated
        and (r.base_method, r.variant, r.sparsity) == (base, variant, sparsity)
        and (arm is None or r.finetune == arm)
    ]


def _cell_wall_s(spec: StudySpec) -> float:
    # From the cells themselves: a search finetuned in two arms is counted once.
    return sum(
        float((read_result(spec, c) or {}).get("wall_s") or 0) for wave in cells_of(spec) for c in wave
    )


def _seeds_text(spec: StudySpec) -> str:
    text = f"seeds {spec.seeds}"
    if spec.extra_seeds:
        extra = "; ".join(f"at {sp:g} also {seeds}" for sp, seeds in spec.extra_seeds.items())
        text += f" at every sparsity ({extra})"
    return text


def _arms_text(spec: StudySpec) -> str:
    texts = [ARM_TEXT[a] + (f" (gamma {spec.awp_gamma})" if a == "awp" else "") for a in spec.arms]
    return (" and ".join(texts) if len(texts) > 1 else texts[0]) + ", each for every method"


def write_study_report(spec: StudySpec) -> Path:
    """Write ``study.csv``, ``study.md`` and plots of a finished study into its folder; return ``study.md``.

    ``study.md`` is the shared report (:func:`~s2ap_lightning.analysis.report.write_report`) with the
    study's statistics as its sections: the regime curve (S2AP minus base against sparsity), means with
    intervals over seeds, the paired differences, the validation accuracy of every gamma, the mask
    statistics.
    """
    folder = spec.folder
    rows = study_rows(spec)
    write_results_csv(rows, folder / "study.csv")
    finals = [r for r in rows if r.selected and r.evaluated]
    wall = _cell_wall_s(spec)
    intro = [
        f"Spec: `{folder / 'spec.yaml'}` (data `{spec.data_config}`); {_seeds_text(spec)}; sparsities "
        f"{spec.sparsities}; gammas {spec.gammas}; epochs pretrain/search/finetune "
        f"{spec.pretrain_epochs}/{spec.prune_epochs}/{spec.finetune_epochs} (S2AP warm-up "
        f"{spec.warmup_epochs}); finetuning: {_arms_text(spec)}. Wall time of the cells, added "
        f"up: {wall / 60:.1f} min (`wall_s` per cell in `cells/`).",
        "Accuracies in %, mean ± 95 % CI half-width over seeds (Student t). Test figures: clean and "
        f"PGD-{spec.eval_pgd_steps} on every test image, AutoAttack on a class-stratified sample of "
        f"{spec.aa_images}. With fewer than {MIN_SEEDS_FOR_INTERVAL} seeds, or where an interval would be "
        "wider than the 0-100 accuracy scale, the mean stands alone with `± n/a` and the reason. The "
        "S2AP gamma of each (seed, sparsity) was chosen by the validation "
        f"PGD-{spec.select_pgd_steps} accuracy of the searched mask, before finetuning (every arm "
        "finetunes the same chosen mask).",
        f"**Collapsed models.** A model whose clean test accuracy is at most the majority-class rate of "
        f"the test images plus {100 * spec.collapse_margin:.1f} points (`collapse_margin` "
        f"{spec.collapse_margin:g}) does no better than answering one class: it is marked `collapsed` "
        "(its failed checks are expected of a constant answer and are not counted as gradient masking), "
        "and every pair with a collapsed member is left out of the paired reading and counted in its "
        "`collapsed` column.",
    ]
    plots = _plots(spec, rows, finals, folder)
    figures = [
        ("Robust accuracy: mean and 95 % CI over seeds", plots[1].name),
        ("Paired per seed", plots[2].name),
    ]
    return write_report(
        folder,
        rows,
        name="study.md",
        title=f"Study `{spec.name}`",
        intro=intro,
        sections=[*regime_lines(spec, rows, plots[0].name), *summary_lines(spec, rows)],
        figures=figures,
    )


def regime_lines(spec: StudySpec, rows: list[ResultRow], plot: str) -> list[str]:
    """The regime section: at which sparsities S2AP differs from its base method; the collapse point."""
    lines = [
        "## Regime: S2AP minus base method against sparsity",
        "",
        f"![regime]({plot})",
        "",
        "Left: the paired difference S2AP minus base method (same seed, same finetuning arm), mean and "
        "95 % Student-t interval over the seeds whose pair has no collapsed member (no bar: too few "
        "seeds); right: the dense and base-method accuracies, with the collapse threshold "
        "(majority-class rate plus the margin).",
        "",
    ]
    for base in spec.base_methods:
        for arm in spec.arms:
            point = collapse_point(rows, base, arm, spec.sparsities)
            if point is None:
                # Below the rule's half, collapsed models are still named: "no collapse" alone would
                # hide that some seeds already answer one class.
                partial = [
                    f"{down} of {n} at {sp:g}"
                    for sp, down, n in collapsed_counts(rows, base, arm, spec.sparsities)
                    if down
                ]
                collapse = f"no collapse point up to {max(spec.sparsities):g}" + (
                    f" (fewer than half of the base models collapsed: {', '.join(partial)})"
                    if partial
                    else ""
                )
            else:
                sp, down, n = point
                before = [s for s in sorted(spec.sparsities) if s < sp]
                just = f"; the sparsity just before it: {before[-1]:g}" if before else ""
                collapse = f"collapse point {sp:g} ({down} of {n} base models collapsed{just})"
            readings = []
            for metric, name in (("pgd_acc", "PGD"), ("aa_acc", "AutoAttack")):
                found = []
                for sp in spec.sparsities:
                    pairs = paired(rows, base, sp, metric, arm)
                    if pairs:
                        diffs = [b - a for a, b in pairs.values()]
                        m, h = mean_ci(diffs)
                        found.append(
                            f"{sp:g}: {interval_text(diffs, signed=True)} ({len(diffs)} pairs, "
                            f"{verdict(m, h, len(diffs))})"
                        )
                if found:
                    readings.append(f"{name} " + "; ".join(found))
            read = ". ".join(readings) if readings else "No pair without a collapsed member"
            lines.append(f"- `{base}`, {arm} finetuning: {collapse}. {read}.")
    dense = [r for r in rows if r.variant == "dense" and r.evaluated]
    down = sum(1 for r in dense if r.collapsed)
    if down:
        lines.append(
            f"- **{down} of {len(dense)} dense (pretrained) models collapsed**: the pretraining did not "
            "learn, so what the pruned models of those seeds show is not the pruning's doing."
        )
    return [*lines, ""]


def summary_lines(spec: StudySpec, rows: list[ResultRow]) -> list[str]:
    """The study's statistics as Markdown lines (the per-run tables follow them in ``study.md``).

    Accuracy per method with intervals over seeds, paired differences, gamma sensitivity, mask statistics.
    """
    finals = [r for r in rows if r.selected and r.evaluated]
    lines: list[str] = []
    failed = [r for r in finals if r.masking_failed]
    if failed:
        lines += [
            f"**{len(failed)} evaluation(s) FAILED a gradient-masking check** (marked `!` below; "
            "details in `study.csv`).",
            "",
        ]
    down = [r for r in finals if r.collapsed]
    if down:
        lines += [f"**{len(down)} finetuned model(s) collapsed** (counted per row below).", ""]
    lines += [
        "## Accuracy per method",
        "",
        "| method | finetune | sparsity | seeds | clean | PGD | AutoAttack | collapsed | checks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str, float], list[ResultRow]] = {}
    for r in finals:
        groups.setdefault((r.method, r.finetune, r.sparsity), []).append(r)
    order = sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0]))
    for (method, arm, sp), group in order:
        cells = [
            _pct([getattr(g, m) for g in group if getattr(g, m) is not None])
            for m in ("clean_acc", "pgd_acc", "aa_acc")
        ]
        bad = sum(1 for g in group if g.masking_failed)
        status = "ok" if not bad else f"{bad} failed !"
        collapsed = sum(1 for g in group if g.collapsed)
        lines.append(
            f"| {method} | {arm or '-'} | {sp:g} | {len(group)} | {' | '.join(cells)} | {collapsed} "
            f"| {status} |"
        )
    lines += [
        "",
        "## Paired difference, S2AP minus base method (same seed, same finetuning arm)",
        "",
        "Pairs with a collapsed member are left out (`collapsed`: how many).",
        "",
        "| base | finetune | sparsity | metric | per seed (points) | mean ± 95 % CI | S2AP wins | collapsed "
        "| reading |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for base in spec.base_methods:
        for arm in spec.arms:
            for sp in spec.sparsities:
                left_out = collapsed_pairs(rows, base, sp, arm)
                kept = [
                    p
                    for p in pair_rows(rows, base, sp, arm).values()
                    if not (p[0].collapsed or p[1].collapsed)
                ]
                # Evaluations of the pairs read here that failed a masking check (the same for every metric).
                flagged = sum(1 for pair in kept for r in pair if r.masking_failed)
                if not kept and left_out:
                    lines.append(
                        f"| {base} | {arm} | {sp:g} | all | - | - | - | {left_out} | "
                        f"every pair has a collapsed member: nothing to read |"
                    )
                for metric in ("pgd_acc", "aa_acc", "clean_acc"):
                    pairs = paired(rows, base, sp, metric, arm)
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
                        f"| {base} | {arm} | {sp:g} | {metric.replace('_acc', '')} | {per_seed} | "
                        f"{interval_text(diffs, signed=True)} | {wins}/{len(diffs)} | {left_out} "
                        f"| {reading} |"
                    )
    lines += [
        "",
        "## Gamma sensitivity: validation PGD accuracy of the searched mask (before finetuning)",
        "",
        "| base | sparsity | gamma | seeds | per seed | mean | chosen on |",
        "|---|---|---|---|---|---|---|",
    ]
    searches = [r for r in rows if r.variant in ("base", "s2ap")]
    for base in spec.base_methods:
        for sp in spec.sparsities:
            seeds = spec.seeds_at(sp)
            for g in [0.0, *spec.gammas]:
                # One value per seed (a search finetuned in two arms has two rows with the same figure).
                mine = [r for r in searches if (r.base_method, r.sparsity, r.gamma or 0.0) == (base, sp, g)]
                by_seed = {r.seed: r for r in mine}
                vals = [by_seed[s].val_mask_pgd_acc for s in seeds if s in by_seed]
                chosen = len({r.seed for r in mine if r.selected and g > 0})
                label = f"{g:g}" if g else "0 (base)"
                mean = f"{100 * sum(vals) / len(vals):.1f}" if vals else "n/a"
                lines.append(
                    f"| {base} | {sp:g} | {label} | {len(vals)} | "
                    + ", ".join(f"{100 * v:.1f}" for v in vals)
                    + f" | {mean} | {chosen if g else '-'} |"
                )
    lines += [
        "",
        "## Mask statistics of the selected searches (mean over seeds)",
        "",
        "| method | sparsity | mask PGD (test, before finetuning) | Hamming, last epoch | lambda_max |",
        "|---|---|---|---|---|",
    ]
    masks: dict[tuple[str, float], dict[int, ResultRow]] = {}
    for r in finals:
        if r.method != "dense":
            masks.setdefault((r.method, r.sparsity), {})[r.seed] = r  # one per seed: the arms share the mask
    for (method, sp), by_seed in sorted(masks.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        group = list(by_seed.values())

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


def _series(values: list[float]) -> tuple[float, float]:
    """Mean and drawn half-width, in points (no bar where study.md prints no interval)."""
    m, h = mean_ci(values)
    return 100 * m, 0.0 if interval_missing(len(values), h) else 100 * h


def _regime_plot(spec: StudySpec, rows: list[ResultRow], folder: Path) -> Path:
    """``regime.png``: S2AP minus base (PGD, AutoAttack) against sparsity, and the accuracies beside it."""
    from s2ap_lightning.analysis.plotting import subplots

    finals = [r for r in rows if r.selected and r.evaluated]
    lines = [(b, a) for b in spec.base_methods for a in spec.arms]
    xs = list(range(len(spec.sparsities)))
    ticks = [f"{s:g}" for s in spec.sparsities]
    fig, axes = subplots(1, 3, figsize=(15, 4.2))
    for ax, metric, title in zip(axes[:2], ("pgd_acc", "aa_acc"), ("PGD", "AutoAttack"), strict=True):
        drawn = False
        for i, (base, arm) in enumerate(lines):
            x, ms, hs = [], [], []
            ns = []
            for j, sp in enumerate(spec.sparsities):
                pairs = paired(rows, base, sp, metric, arm)
                if pairs:
                    m, h = _series([b - a for a, b in pairs.values()])
                    x.append(j + 0.08 * (i - (len(lines) - 1) / 2))
                    ms.append(m)
                    hs.append(h)
                    ns.append(len(pairs))
            if x:
                bars = ax.errorbar(x, ms, yerr=hs, marker="o", capsize=4, label=f"{base}, {arm} finetuning")
                for xi, mi, n in zip(x, ms, ns, strict=True):  # the pairs behind each point
                    ax.annotate(f"n={n}", (xi, mi), fontsize=7, xytext=(4, 2), textcoords="offset points",
                                color=bars[0].get_color())  # fmt: skip
                drawn = True
        ax.axhline(0.0, color="grey", lw=0.8)
        for j, sp in enumerate(spec.sparsities):
            if not any(paired(rows, b, sp, metric, a) for b, a in lines) and any(
                collapsed_pairs(rows, b, sp, a) for b, a in lines
            ):
                ax.annotate("every pair\ncollapsed", (j, 0.0), fontsize=7, ha="center", va="bottom")
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_xticks(xs, ticks)
        ax.set_xlabel("sparsity")
        ax.set_ylabel(f"{title}: S2AP minus base (points)")
        ax.set_title(f"{title}, paired difference: mean and 95 % CI")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no complete pair", ha="center", transform=ax.transAxes)
    ax = axes[2]
    styles = {
        "clean_acc": ("tab:green", "clean"),
        "pgd_acc": ("tab:blue", "PGD"),
        "aa_acc": ("tab:red", "AutoAttack"),
    }
    dense = [r for r in finals if r.variant == "dense"]
    for metric, (color, name) in styles.items():
        values = [getattr(r, metric) for r in dense if getattr(r, metric) is not None]
        if values:
            ax.axhline(100 * sum(values) / len(values), color=color, ls=":", label=f"dense {name}")
        for k, (base, arm) in enumerate(lines):
            x, ms, hs = [], [], []
            for j, sp in enumerate(spec.sparsities):
                vals = [
                    getattr(r, metric)
                    for r in _finals_of(rows, base, "base", sp, arm)
                    if getattr(r, metric) is not None
                ]
                if vals:
                    m, h = _series(vals)
                    x.append(j)
                    ms.append(m)
                    hs.append(h)
            if x:
                style = ("-", "--", "-.", ":")[k % 4]
                ax.errorbar(x, ms, yerr=hs, marker="o", ls=style, color=color, capsize=3,
                            label=f"{base} {name}, {arm}")  # fmt: skip
    rates = [r.majority_class_rate for r in finals if r.majority_class_rate is not None]
    if rates:
        threshold = 100 * (sum(rates) / len(rates) + spec.collapse_margin)
        ax.axhline(threshold, color="black", lw=0.8, ls="--", label="collapse threshold")
    ax.set_xlim(-0.5, len(xs) - 0.5)
    ax.set_xticks(xs, ticks)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("dense and base-method accuracy (all seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "regime.png"
    fig.savefig(path, dpi=100)
    return path


def _plots(spec: StudySpec, rows: list[ResultRow], finals: list[ResultRow], folder: Path) -> list[Path]:
    from s2ap_lightning.analysis.plotting import subplots

    out = [_regime_plot(spec, rows, folder)]
    fig, axes = subplots(1, 2, figsize=(10, 4))
    labels = sorted({(r.method, r.finetune) for r in finals if r.method != "dense"})
    for ax, metric, title in zip(axes, ("pgd_acc", "aa_acc"), ("PGD", "AutoAttack"), strict=True):
        for i, (method, arm) in enumerate(labels):
            xs, ms, hs = [], [], []
            for sp in spec.sparsities:
                vals = [
                    getattr(r, metric)
                    for r in finals
                    if (r.method, r.finetune, r.sparsity) == (method, arm, sp)
                    and getattr(r, metric) is not None
                ]
                if vals:
                    m, h = _series(vals)  # no bar where study.md prints no interval
                    xs.append(i * 0.1 + spec.sparsities.index(sp))
                    ms.append(m)
                    hs.append(h)
            ax.errorbar(
                xs,
                ms,
                yerr=hs,
                marker="o",
                capsize=4,
                label=f"{method}, {arm}" if len(spec.arms) > 1 else method,
            )
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

    grid = [(b, a) for b in spec.base_methods for a in spec.arms]
    fig, axes = subplots(
        len(grid), len(spec.sparsities), figsize=(4 * len(spec.sparsities), 4 * len(grid)), squeeze=False
    )
    for row_axes, (base, arm) in zip(axes, grid, strict=True):
        for ax, sp in zip(row_axes, spec.sparsities, strict=True):
            pairs = paired(rows, base, sp, "pgd_acc", arm)
            for seed, (a, b) in sorted(pairs.items()):
                color = (
                    "tab:green" if b > a else "tab:red" if b < a else "tab:gray"
                )  # S2AP ahead, behind, tied
                ax.plot([0, 1], [100 * a, 100 * b], marker="o", color=color, alpha=0.8)
                if len(pairs) <= 10:
                    ax.annotate(f"seed {seed}", (1.02, 100 * b), fontsize=7)
            ax.set_xticks([0, 1], [base, f"{base}+s2ap"])
            ax.set_xlim(-0.2, 1.35)
            ax.set_ylabel("PGD accuracy (%)")
            left_out = collapsed_pairs(rows, base, sp, arm)
            note = f", {left_out} collapsed left out" if left_out else ""
            ax.set_title(f"{arm} finetuning, sparsity {sp:g}{note}", fontsize=9)
    fig.tight_layout()
    out.append(folder / "paired_per_seed.png")
    fig.savefig(out[-1], dpi=100)
    return out
