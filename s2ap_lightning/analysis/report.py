"""Evaluation records (JSON beside the checkpoint) and the Markdown report of a runs folder."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

from s2ap_lightning.analysis.plotting import subplots
from s2ap_lightning.analysis.stability import hamming, load_masks
from s2ap_lightning.checkpoint import load_file
from s2ap_lightning.evaluation.record import git_commit
from s2ap_lightning.export import sparsity_table

#: The columns of the demo's results.csv, the one definition the demo writes and the report reads.
RESULTS_COLUMNS = [
    "method",
    "sparsity",
    "seed",
    "gamma",
    "clean_acc",
    "pgd_acc",
    "aa_acc",
    "n_test",
    "n_aa",
    "checks_passed",
    "mask_pgd_acc",
    "mask_hamming_last_epoch",
    "lambda_max",
    "sharpness",
    "global_sparsity",
]


def _read_results(path: Path) -> list[dict[str, Any]]:
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
    files = ([mask_dir / "init.pt"] if (mask_dir / "init.pt").exists() else []) + sorted(
        mask_dir.glob("epoch_*.pt")
    )
    masks = [load_masks(f) for f in files]
    return [hamming(a, b)[0] for a, b in zip(masks, masks[1:], strict=False)]


def write_report(runs: Path) -> Path:
    """``report.md`` plus PNG plots from a runs folder written by the demo (or laid out like it)."""
    all_rows = _read_results(runs / "results.csv")
    # The dense model (sparsity 0) is a reference line, not a pruning method.
    dense = [r for r in all_rows if r["method"] == "dense"]
    rows = [r for r in all_rows if r["method"] != "dense"]
    methods = sorted({r["method"] for r in rows})
    sparsities = sorted({r["sparsity"] for r in rows})
    figures: list[tuple[str, str]] = []

    fig, ax = subplots(figsize=(5, 3.5))
    for r in dense:
        ax.axhline(r["pgd_acc"], color="grey", linestyle=":", label="dense PGD")
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

    hidden = ("seed", "gamma", "global_sparsity")  # constant or implied in a demo's table
    cols = [c for c in RESULTS_COLUMNS if c in all_rows[0] and c not in hidden]

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
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in all_rows]
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


RECORD_HEADER = (
    "| record | stage | method | sparsity | gamma | clean | PGD | AutoAttack | images (AA) | checks |"
)


def _record_row(r: dict[str, Any], pct: Any) -> str:
    cells = [
        f"`{r['record']}`",
        str(r["stage"]),
        str(r["base_method"] or "-"),
        "-" if r["sparsity"] is None else f"{r['sparsity']:g}",
        "-" if r["gamma"] is None else f"{r['gamma']:g}",
        pct(r["clean_acc"]),
        pct(r["pgd_acc"]),
        pct(r["aa_acc"]),
        f"{r['n_images']} ({r['n_aa_images']})",
        "ok" if r["passed"] else "FAILED",
    ]
    return "| " + " | ".join(cells) + " |"


def find_records(folder: Path) -> list[Path]:
    """Every evaluation record ``s2ap test`` wrote under ``folder``.

    ``*.eval.json`` and ``eval.json``, and the later evaluations of the same checkpoint, which are
    numbered (``*.eval.2.json``) rather than written over the first.
    """
    names = ("*.eval.json", "eval.json", "*.eval.*.json", "eval.*.json")
    return sorted({p for name in names for p in folder.rglob(name)})


def write_records_report(folder: Path) -> Path:
    """``report.md`` from the JSON records ``s2ap test`` wrote anywhere under ``folder``.

    One row per record: what was evaluated, the figures with the images behind them, and whether the
    gradient-masking checks passed. Accuracy against sparsity is plotted when records span sparsities.
    """
    paths = find_records(folder)
    if not paths:
        raise FileNotFoundError(
            f"{folder} holds no evaluation records (*.eval.json written by `s2ap test`) and no results.csv "
            "(written by `s2ap demo`); evaluate a checkpoint with `s2ap test --ckpt_path ...` first"
        )
    rows = []
    for path in paths:
        rec = json.loads(path.read_text())
        hp = rec.get("hyper_parameters") or {}
        protocol = rec.get("protocol") or {}
        rows.append(
            {
                "group": (
                    str((rec.get("dataset") or {}).get("dataset", "?")),
                    str(protocol.get("norm", "?")),
                    protocol.get("eps"),
                ),
                "record": str(path.relative_to(folder)),
                "stage": rec.get("stage"),
                "base_method": hp.get("base_method", ""),
                "sparsity": hp.get("sparsity"),
                "gamma": hp.get("gamma"),
                **{k: rec.get(k) for k in ("clean_acc", "pgd_acc", "aa_acc", "n_images", "n_aa_images")},
                "passed": rec.get("all_checks_passed"),
            }
        )

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}"

    lines = [
        f"# Evaluation records under `{folder}`",
        "",
        f"{len(rows)} record(s); accuracies in %. Generated {time.strftime('%Y-%m-%d %H:%M')} "
        f"(project commit {git_commit()}). One table per dataset and threat model (the evaluated one): "
        "figures measured at different budgets are not comparable.",
    ]
    groups = sorted({r["group"] for r in rows}, key=lambda g: (g[0], g[1], g[2] if g[2] is not None else -1))
    for dataset, norm, eps in groups:
        lines += [
            "",
            f"## dataset `{dataset}`, {norm} eps {'?' if eps is None else f'{eps:g}'}",
            "",
            RECORD_HEADER,
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [_record_row(r, pct) for r in rows if r["group"] == (dataset, norm, eps)]
    sparse = [r for r in rows if r["sparsity"] is not None and r["pgd_acc"] is not None]
    if len({r["sparsity"] for r in sparse}) > 1:
        fig, ax = subplots(figsize=(5, 3.5))
        for gamma_on in (False, True):
            pts = sorted((r["sparsity"], r["pgd_acc"]) for r in sparse if bool(r["gamma"]) == gamma_on)
            if pts:
                ax.plot(
                    *zip(*pts, strict=True), marker="o", ls="", label="S2AP" if gamma_on else "base method"
                )
        ax.set_xlabel("sparsity")
        ax.set_ylabel("PGD accuracy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "records_pgd_vs_sparsity.png", dpi=120)
        lines += ["", "![PGD accuracy against sparsity](records_pgd_vs_sparsity.png)"]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
