"""Evaluation records (JSON beside the checkpoint) and the Markdown report of a runs folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from s2ap_lightning.analysis.plotting import subplots
from s2ap_lightning.evaluation.record import git_commit


def _read_results(path: Path) -> list[dict[str, Any]]:
    import csv

    rows = []
    with open(path) as fh:
        for row in csv.DictReader(fh):
            parsed: dict[str, Any] = {}
            for k, v in row.items():
                try:
                    parsed[k] = float(v) if v not in ("", "None") else None
                except ValueError:
                    parsed[k] = v
            rows.append(parsed)
    return rows


def hamming_history(mask_dir: Path) -> list[float]:
    """Hamming distance between consecutive saved masks (``init``, ``epoch_000``, ...)."""
    from s2ap_lightning.analysis.stability import hamming, load_masks

    files = ([mask_dir / "init.pt"] if (mask_dir / "init.pt").exists() else []) + sorted(
        mask_dir.glob("epoch_*.pt")
    )
    masks = [load_masks(f) for f in files]
    return [hamming(a, b)[0] for a, b in zip(masks, masks[1:], strict=False)]


def write_report(runs: Path) -> Path:
    """``report.md`` plus PNG plots from a runs folder written by the demo (or laid out like it)."""
    from s2ap_lightning.export import sparsity_table

    rows = _read_results(runs / "results.csv")
    methods = sorted({r["method"] for r in rows})
    sparsities = sorted({r["sparsity"] for r in rows})
    figures: list[tuple[str, str]] = []

    fig, ax = subplots(figsize=(5, 3.5))
    for method in methods:
        sub = sorted((r for r in rows if r["method"] == method), key=lambda r: r["sparsity"])
        xs = [r["sparsity"] for r in sub]
        ax.plot(xs, [r["pgd_acc"] for r in sub], marker="o", label=f"{method} PGD")
        if all(r.get("aa_acc") is not None for r in sub):
            ax.plot(xs, [r["aa_acc"] for r in sub], marker="s", linestyle="--", label=f"{method} AutoAttack")
    ax.set_xlabel("sparsity (pruned fraction)")
    ax.set_ylabel("robust accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(runs / "robust_vs_sparsity.png", dpi=120)
    figures.append(("Robust accuracy against sparsity", "robust_vs_sparsity.png"))

    fig, axes = subplots(1, len(sparsities), figsize=(4.5 * len(sparsities), 3.3), squeeze=False)
    for ax, sp in zip(axes[0], sparsities, strict=True):
        for method in methods:
            folder = runs / f"{method}_sp{sp:g}" / "masks"
            if folder.is_dir():
                hist = hamming_history(folder)
                ax.plot(range(len(hist)), hist, marker=".", label=method)
        ax.set_title(f"sparsity {sp:g}")
        ax.set_xlabel("mask-search epoch")
        ax.set_ylabel("normalised Hamming to previous epoch")
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.legend()
    fig.tight_layout()
    fig.savefig(runs / "hamming_per_epoch.png", dpi=120)
    figures.append(("Mask stability: flips per epoch, HYDRA against S2AP", "hamming_per_epoch.png"))

    if all(r.get("lambda_max") is not None for r in rows):
        fig, ax = subplots(figsize=(5, 3.5))
        labels = [f"{r['method']}\n{r['sparsity']:g}" for r in rows]
        ax.bar(
            labels,
            [r["lambda_max"] for r in rows],
            color=["tab:blue" if r["method"] == "hydra" else "tab:orange" for r in rows],
        )
        ax.set_ylabel("top Hessian eigenvalue (scores)")
        fig.tight_layout()
        fig.savefig(runs / "lambda_max.png", dpi=120)
        figures.append(("Score-space sharpness after mask search", "lambda_max.png"))

    layer_tables = {}
    for r in rows:
        path = runs / f"{r['method']}_sp{r['sparsity']:g}" / "pruned_model.pt"
        if path.exists():
            from s2ap_lightning.checkpoint import load_file

            layer_tables[f"{r['method']} {r['sparsity']:g}"] = sparsity_table(load_file(path))[0]
    if layer_tables:
        fig, ax = subplots(figsize=(6, 3.5))
        for label, table in layer_tables.items():
            ax.plot(
                [t[0].removesuffix(".weight") for t in table], [t[3] for t in table], marker="o", label=label
            )
        ax.set_ylabel("sparsity per layer")
        ax.tick_params(axis="x", rotation=60)
        ax.legend()
        fig.tight_layout()
        fig.savefig(runs / "layer_sparsity.png", dpi=120)
        figures.append(("Per-layer sparsity of the exported models", "layer_sparsity.png"))

    cols = [
        c
        for c in (
            "method",
            "sparsity",
            "clean_acc",
            "pgd_acc",
            "aa_acc",
            "n_test",
            "n_aa",
            "mask_pgd_acc",
            "mask_hamming_last_epoch",
            "lambda_max",
            "sharpness",
        )
        if c in rows[0]
    ]

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [
        f"# s2ap-lightning report: `{runs}`",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} from `{runs / 'results.csv'}` "
        f"(project commit {git_commit()}).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    lines += [
        "",
        "Accuracies are fractions. `n_test` images for clean and PGD accuracy, `n_aa` for "
        "AutoAttack; `mask_pgd_acc` is the pretrained weights under the searched mask, before "
        "finetuning; `lambda_max` and `sharpness` are measured on a fixed validation subset.",
        "",
    ]
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    out = runs / "report.md"
    out.write_text("\n".join(lines))
    return out
