"""One result row for every job and tool, and the one Markdown report written from such rows.

The demo, ``s2ap study`` and ``s2ap report`` describe an evaluated model the same way
(:class:`ResultRow`: what was evaluated, its test figures and checks, its mask statistics) and write
it through the same functions: :func:`write_results_csv` / :func:`read_results_csv` for the table of
rows and :func:`write_report` for the Markdown report with its plots. A row is built from an
in-process evaluation (:meth:`ResultRow.from_record`), from the JSON records ``s2ap test`` writes
(:func:`record_rows`), or from a stored row of any version (:meth:`ResultRow.from_dict` maps the keys
older demos and studies wrote), so results written before a change stay readable.
"""

from __future__ import annotations

import csv
import json
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from s2ap_lightning.analysis.plotting import subplots
from s2ap_lightning.analysis.stability import hamming, load_masks
from s2ap_lightning.checkpoint import CheckpointError, atomic_file, load_file
from s2ap_lightning.evaluation.record import git_commit
from s2ap_lightning.export import plain_model, sparsity_table
from s2ap_lightning.pruning.methods import method_from_config

#: What a row's model is: the dense (pretrained) model, a base-method mask, or an S2AP mask.
VARIANTS = ("dense", "base", "s2ap")
#: How a pruned model was finetuned ("" when it was not: the dense model, a mask search).
FINETUNE_ARMS = ("plain", "awp")


@dataclass
class ResultRow:
    """One evaluated (or searched) model: what it is, its figures and checks, its mask statistics.

    Args:
        seed: seed of the run (its pretraining, data order and evaluation sample).
        base_method: the score-based method the mask was searched with (``hydra``, ``harp``); ``""``
            for the dense model or where a record does not say.
        variant: ``dense``, ``base`` (the base method alone) or ``s2ap`` (S2AP on the base method);
            ``""`` where a record does not say (a finetuning record does not store its search's gamma).
        sparsity: pruned fraction (0 for the dense model; None where unknown).
        gamma: S2AP's score-space radius, on ``s2ap`` rows only (``gamma`` means nothing else).
        finetune: the finetuning arm, ``plain`` or ``awp``; ``""`` for a model that was not finetuned.
        stage: the stage whose checkpoint was evaluated (``pretrain``, ``search``, ``finetune``, or
            the stage class a ``s2ap test`` record names).
        selected: in a study, whether this search was finetuned and tested (gamma chosen on validation).
        clean_acc: clean test accuracy (fractions throughout).
        pgd_acc: PGD accuracy on the same images.
        aa_acc: AutoAttack accuracy on the class-stratified sample of ``n_aa`` images.
        n_test: images behind ``clean_acc`` and ``pgd_acc``.
        n_aa: images behind ``aa_acc``.
        checks_passed: whether every gradient-masking check of the evaluation passed.
        check_failures: the failed checks that point at gradient masking or a broken evaluation, each
            ``name: detail`` (a collapsed model's failed checks are not listed: see ``collapsed``).
        collapsed: the model does no better than always answering the most common class (clean
            accuracy at most the majority-class rate plus the protocol's ``collapse_margin``): its
            failed checks are expected, not evidence of masking, and a study leaves it out of the
            paired reading. None where the record does not say (older versions).
        majority_class_rate: the share of the evaluated images in their most common class.
        val_mask_pgd_acc: validation PGD accuracy of the searched mask before finetuning (selects gamma).
        n_val: validation images behind ``val_mask_pgd_acc``.
        mask_pgd_acc: test PGD accuracy of the pretrained weights under the searched mask.
        mask_hamming_last_epoch: normalised Hamming distance of the mask over the last search epoch.
        lambda_max: score-space sharpness: top Hessian eigenvalue of the robust loss w.r.t. the scores.
        sharpness: loss increase under S2AP's worst score perturbation (the same validation subset).
        global_sparsity: measured pruned fraction of the evaluated network.
        dataset: dataset name.
        threat: the evaluated threat model, as :func:`threat_text` writes it.
        autoattack: which AutoAttack attacks ran.
        wall_s: wall time of the run, seconds.
        git_commit: the project's commit that produced the row.
        source: where the row comes from (a study cell, a record file).
        checkpoint: the evaluated checkpoint.
        search_checkpoint: the mask search's checkpoint (its folder holds the per-epoch masks).

    """

    seed: int | None = None
    base_method: str = ""
    variant: str = ""
    sparsity: float | None = None
    gamma: float | None = None
    finetune: str = ""
    stage: str = ""
    selected: bool = True
    clean_acc: float | None = None
    pgd_acc: float | None = None
    aa_acc: float | None = None
    n_test: int | None = None
    n_aa: int | None = None
    checks_passed: bool | None = None
    check_failures: list[str] = field(default_factory=list)
    collapsed: bool | None = None
    majority_class_rate: float | None = None
    val_mask_pgd_acc: float | None = None
    n_val: int | None = None
    mask_pgd_acc: float | None = None
    mask_hamming_last_epoch: float | None = None
    lambda_max: float | None = None
    sharpness: float | None = None
    global_sparsity: float | None = None
    dataset: str = ""
    threat: str = ""
    autoattack: str | None = None
    wall_s: float | None = None
    git_commit: str | None = None
    source: str = ""
    checkpoint: str | None = None
    search_checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.variant not in ("", *VARIANTS):
            raise ValueError(f"variant={self.variant!r} is unknown; valid: {', '.join(VARIANTS)}")
        if self.finetune not in ("", *FINETUNE_ARMS):
            raise ValueError(f"finetune={self.finetune!r} is unknown; valid: {', '.join(FINETUNE_ARMS)}")

    @property
    def method(self) -> str:
        """``dense``, the base method (``hydra``), or S2AP on it (``hydra+s2ap``): the label of plots."""
        if self.variant == "dense":
            return "dense"
        if self.variant == "s2ap":
            return f"{self.base_method}+s2ap" if self.base_method else "s2ap"
        return self.base_method or self.stage or "?"

    @property
    def masking_failed(self) -> bool:
        """A failed gradient-masking check on a model that is not collapsed (a collapsed one is named so)."""
        return self.checks_passed is False and not self.collapsed

    @property
    def evaluated(self) -> bool:
        """Whether the row has test figures (a search that was not finetuned has none)."""
        return self.clean_acc is not None

    def as_dict(self) -> dict[str, Any]:
        """The row with its ``method`` label, in :data:`RESULT_COLUMNS` order (JSON-safe)."""
        values = {**asdict(self), "method": self.method}
        return {k: values[k] for k in RESULT_COLUMNS}

    @classmethod
    def from_record(cls, record: Any, **what: Any) -> ResultRow:
        """A row from an evaluation record (:class:`~s2ap_lightning.evaluation.EvalRecord`).

        Args:
            record: the record :func:`~s2ap_lightning.evaluation.evaluate` returned.
            **what: what was evaluated and anything else known (other :class:`ResultRow` fields).

        """
        return cls(
            **what,
            clean_acc=record.clean_acc,
            pgd_acc=record.pgd_acc,
            aa_acc=record.aa_acc,
            n_test=record.n_images,
            n_aa=record.n_aa_images,
            checks_passed=record.passed,
            check_failures=list(record.failures()),
            collapsed=record.collapsed,
            majority_class_rate=record.majority_class_rate,
            autoattack=record.autoattack,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResultRow:
        """A row from a stored one: a study cell's JSON, a CSV line (strings), any version's keys.

        Keys of older versions are mapped: ``cell`` is the ``source``; a study's ``awp`` flag is the
        ``finetune`` arm; the ``variant`` comes from ``method`` (``dense``, ``hydra+s2ap``, or the old
        demo's ``s2ap``, whose base method its CSV did not record); a ``gamma`` on a row that is not
        S2AP (the base method's 0) is dropped. Unknown keys are ignored.
        """
        legacy = ("method", "cell", "kind", "awp")  # keys of older versions, mapped below
        d = {k: _parsed(k, v) for k, v in data.items() if k in _HINTS or k in legacy}
        method = str(d.pop("method", "") or "")
        if not d.get("source"):
            d["source"] = str(d.get("cell") or "")
        awp = d.get("awp")
        if not d.get("finetune") and awp is not None:
            on = awp.strip().lower() == "true" if isinstance(awp, str) else bool(awp)
            d["finetune"] = "awp" if on else "plain"
        if not d.get("variant"):
            if method == "dense":
                d["variant"] = "dense"
            elif method == "s2ap" or method.endswith("+s2ap"):
                d["variant"] = "s2ap"
            elif method or d.get("base_method"):
                d["variant"] = "base"
        if "base_method" not in d:
            # The old demo's results.csv named runs `hydra` and `s2ap`: the latter's base it did not record.
            d["base_method"] = "" if method in ("dense", "s2ap") else method.removesuffix("+s2ap")
        if not d.get("stage"):
            d["stage"] = str(d.get("kind") or "")
        if not d["stage"]:
            evaluated = d.get("clean_acc") is not None
            d["stage"] = "pretrain" if d.get("variant") == "dense" else "finetune" if evaluated else "search"
        if d.get("variant") != "s2ap":
            d["gamma"] = None  # the base method's gamma 0 of older rows: gamma is S2AP's radius only
        return cls(**{k: v for k, v in d.items() if k in _HINTS and (v is not None or k == "gamma")})


_HINTS = typing.get_type_hints(ResultRow)

#: The columns of results.csv and study.csv: every field of :class:`ResultRow`, with its ``method`` label.
RESULT_COLUMNS = ["seed", "method", *[f.name for f in fields(ResultRow) if f.name != "seed"]]


def _parsed(name: str, value: Any) -> Any:
    """``value`` of field ``name`` as the row's type: CSV cells are strings, JSON values are typed."""
    if name == "check_failures":
        if isinstance(value, str):
            return [part for part in value.split("; ") if part]
        return list(value or [])
    if not isinstance(value, str):
        return value
    hint = _HINTS.get(name)
    kinds = set(typing.get_args(hint)) or {hint}
    if value in ("", "None", "nan") and type(None) in kinds:
        return None  # an empty CSV cell of an optional field
    if str in kinds or hint is None:
        return value
    if bool in kinds:
        return value.strip().lower() in ("true", "1", "yes")
    if int in kinds:
        return int(float(value))
    return float(value)


def threat_text(norm: str | None, eps: float | str | None) -> str:
    """The threat model as rows and report headings name it, e.g. ``linf eps 0.1``."""
    return f"{norm or '?'} eps {'?' if eps is None else f'{float(eps):g}'}"


# ----------------------------------------------------------------------------- rows on disk
def write_results_csv(rows: Sequence[ResultRow], path: str | Path) -> Path:
    """Write rows as CSV (:data:`RESULT_COLUMNS`), atomically: a crash keeps the previous file."""
    path = Path(path)
    with atomic_file(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        for row in rows:
            values = row.as_dict()
            writer.writerow({**values, "check_failures": "; ".join(values["check_failures"])})
    return path


def read_results_csv(path: str | Path) -> list[ResultRow]:
    """Rows from a results.csv or study.csv of this or an older version (see :meth:`ResultRow.from_dict`)."""
    with open(path, newline="") as fh:
        return [ResultRow.from_dict(line) for line in csv.DictReader(fh)]


def find_records(folder: Path) -> list[Path]:
    """Every evaluation record ``s2ap test`` wrote under ``folder``.

    ``*.eval.json`` and ``eval.json``, and the later evaluations of the same checkpoint, which are
    numbered (``*.eval.2.json``) rather than written over the first.
    """
    names = ("*.eval.json", "eval.json", "*.eval.*.json", "eval.*.json")
    return sorted({p for name in names for p in folder.rglob(name)})


def _record_threat(record: Mapping[str, Any]) -> str:
    # The evaluated threat model: `threat_model` (older records: inside `protocol`).
    threat = record.get("threat_model") or record.get("threat") or record.get("protocol") or {}
    return threat_text(threat.get("norm"), threat.get("eps"))


def record_row(record: Mapping[str, Any], source: str) -> ResultRow:
    """A row from the JSON record ``s2ap test`` wrote (the stage's hyper-parameters say what it is)."""
    hp = record.get("hyper_parameters") or {}
    stage = str(record.get("stage") or "")
    gamma = hp.get("gamma")
    if "sparsity" not in hp and "awp_gamma" not in hp:
        variant = "dense"
    elif gamma is not None:
        variant = "s2ap" if gamma > 0 else "base"
    else:
        variant = ""  # a finetuning run does not store the gamma of the search it started from
    seed = record.get("seed")
    checks = record.get("checks") or {}
    return ResultRow(
        seed=int(seed) if seed not in (None, "") else None,
        base_method=_method_name(hp),
        variant=variant,
        sparsity=0.0 if variant == "dense" else hp.get("sparsity"),
        gamma=gamma if variant == "s2ap" else None,
        finetune=("awp" if hp["awp_gamma"] else "plain") if "awp_gamma" in hp else "",
        stage=stage,
        clean_acc=record.get("clean_acc"),
        pgd_acc=record.get("pgd_acc"),
        aa_acc=record.get("aa_acc"),
        n_test=record.get("n_images"),
        n_aa=record.get("n_aa_images"),
        checks_passed=record.get("all_checks_passed"),
        # Failed checks of a collapsed model (verdict `collapsed`) are not masking; old records: no verdict.
        check_failures=[
            f"{n}: {c.get('detail')}"
            for n, c in checks.items()
            if c.get("verdict", "passed" if c.get("passed") else "failed") == "failed"
        ],
        collapsed=record.get("collapsed"),
        majority_class_rate=record.get("majority_class_rate"),
        dataset=str((record.get("dataset") or {}).get("dataset", "?")),
        threat=_record_threat(record),
        autoattack=record.get("autoattack"),
        git_commit=record.get("git_commit"),
        source=source,
        checkpoint=record.get("checkpoint"),
    )


def record_rows(folder: str | Path) -> list[ResultRow]:
    """One row per evaluation record (``*.eval.json``) under ``folder``; refused when there is none."""
    folder = Path(folder)
    paths = find_records(folder)
    if not paths:
        raise FileNotFoundError(
            f"{folder} holds no evaluation records (*.eval.json written by `s2ap test`), no results.csv "
            "(written by `s2ap demo`) and no study (cells/ and spec.yaml); evaluate a checkpoint with "
            "`s2ap test --ckpt_path ...` first"
        )
    return [record_row(json.loads(p.read_text()), str(p.relative_to(folder))) for p in paths]


# ----------------------------------------------------------------------------- the report
def _pct(v: float | None) -> str | None:
    return None if v is None else f"{100 * v:.1f}"


def _num(v: float | None, spec: str = ".4g") -> str | None:
    return None if v is None else format(v, spec)


#: The columns of the report's tables: header and cell; a column empty in every row is left out.
TABLE_COLUMNS: list[tuple[str, Callable[[ResultRow], str | None]]] = [
    ("run", lambda r: f"`{r.source}`" if r.source else None),
    ("stage", lambda r: r.stage or None),
    ("base method", lambda r: r.base_method or None),
    ("sparsity", lambda r: _num(r.sparsity, "g")),
    ("variant", lambda r: r.variant or None),
    ("gamma", lambda r: _num(r.gamma, "g")),
    ("seed", lambda r: None if r.seed is None else str(r.seed)),
    ("finetune", lambda r: r.finetune or None),
    ("clean", lambda r: _pct(r.clean_acc)),
    ("PGD", lambda r: _pct(r.pgd_acc)),
    ("AutoAttack", lambda r: _pct(r.aa_acc)),
    ("images (AA)", lambda r: None if r.n_test is None else f"{r.n_test} ({r.n_aa or 0})"),
    ("mask PGD", lambda r: _pct(r.mask_pgd_acc)),
    ("Hamming, last epoch", lambda r: _num(r.mask_hamming_last_epoch)),
    ("lambda_max", lambda r: _num(r.lambda_max)),
    ("global sparsity", lambda r: _num(r.global_sparsity, ".4f")),
    ("checks", lambda r: _checks_cell(r)),
]


def _checks_cell(row: ResultRow) -> str | None:
    # A collapsed model is named as such: its failed checks are not evidence of gradient masking.
    if row.collapsed:
        return "collapsed"
    return None if row.checks_passed is None else ("ok" if row.checks_passed else "FAILED")


def results_table(rows: Sequence[ResultRow]) -> list[str]:
    """The Markdown table of ``rows`` (accuracies in %); columns no row fills are left out."""
    cells = [[get(r) for _, get in TABLE_COLUMNS] for r in rows]
    keep = [i for i in range(len(TABLE_COLUMNS)) if any(c[i] is not None for c in cells)]
    lines = [
        "| " + " | ".join(TABLE_COLUMNS[i][0] for i in keep) + " |",
        "|" + "---|" * len(keep),
    ]
    lines += ["| " + " | ".join(c[i] or "-" for i in keep) + " |" for c in cells]
    return lines


TABLE_NOTE = (
    "Accuracies in %: clean and PGD on the first number of `images (AA)` test images, AutoAttack on the "
    "class-stratified sample in brackets. `mask PGD` is the pretrained weights under the searched mask, "
    "before finetuning; `lambda_max` (score-space sharpness: the top Hessian eigenvalue of the robust "
    "loss w.r.t. the scores) is measured on a fixed validation subset; `Hamming, last epoch` is the "
    "fraction of mask entries the last search epoch flipped. `checks`: the gradient-masking checks; "
    "`collapsed`: clean accuracy within the collapse margin of the majority-class rate (the model "
    "answers one class; its failed checks are expected and are not read as masking)."
)


def write_report(
    folder: str | Path,
    rows: Sequence[ResultRow] | None = None,
    *,
    name: str = "report.md",
    title: str | None = None,
    intro: Sequence[str] = (),
    sections: Sequence[str] = (),
    figures: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write the Markdown report of result rows, with its PNG plots, into ``folder``; return its path.

    One writer for the demo (``report.md``), the study (``study.md``, with its statistics as
    ``sections``) and ``s2ap report``: one table of the evaluated rows per dataset and evaluated
    threat model (figures measured at different budgets are not comparable), then the plots.

    Args:
        folder: where the report and its plots go.
        rows: the rows (default: ``folder/results.csv``); rows without test figures stay out of the
            tables but feed the plots of the mask search.
        name: file name of the report.
        title: its first heading (default: the folder).
        intro: paragraphs under the title (how the figures were measured).
        sections: Markdown lines before the tables (a study's summary statistics).
        figures: ``(title, file name)`` of plots the caller drew into ``folder``; a plot of the same
            file name is not drawn here.

    """
    folder = Path(folder)
    rows = list(read_results_csv(folder / "results.csv") if rows is None else rows)
    evaluated = [r for r in rows if r.evaluated]
    if not evaluated:
        raise ValueError(f"{folder}: no evaluated runs to report (no row has test figures)")
    lines = [
        f"# {title or f's2ap-lightning report: `{folder}`'}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} from {len(evaluated)} evaluated run(s) "
        f"(project commit {git_commit()}).",
        "",
    ]
    for paragraph in intro:
        lines += [paragraph, ""]
    lines += list(sections)
    groups = list(dict.fromkeys((r.dataset, r.threat) for r in evaluated))
    for dataset, threat in groups:
        heading = (
            f"dataset `{dataset or '?'}`, {threat or 'threat model ?'}" if dataset or threat else "Results"
        )
        lines += [*([""] if lines[-1] else []), f"## {heading}", ""]
        lines += results_table([r for r in evaluated if (r.dataset, r.threat) == (dataset, threat)])
    lines += ["", TABLE_NOTE]
    failed = [r for r in evaluated if r.masking_failed]
    if failed:
        lines += ["", f"**{len(failed)} evaluation(s) FAILED a gradient-masking check:**", ""]
        lines += [
            f"- {r.source or r.method} ({r.method}, sparsity {r.sparsity}): " + "; ".join(r.check_failures)
            for r in failed
        ]
    drawn = [*figures, *_draw_figures(folder, rows, skip={f for _, f in figures})]
    for caption, file in drawn:
        lines += ["", f"## {caption}", "", f"![{caption}]({file})"]
    path = folder / name
    with atomic_file(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- plots
def hamming_history(mask_dir: Path) -> list[float]:
    """Hamming distance between consecutive saved masks (``init``, ``epoch_000``, ...)."""
    files = ([mask_dir / "init.pt"] if (mask_dir / "init.pt").exists() else []) + sorted(
        mask_dir.glob("epoch_*.pt")
    )
    masks = [load_masks(f) for f in files]
    return [hamming(a, b)[0] for a, b in zip(masks, masks[1:], strict=False)]


def _existing(folder: Path, *paths: str | Path | None) -> Path | None:
    """The first of ``paths`` that exists, as given or under ``folder`` (paths are stored as run)."""
    for p in paths:
        if p:
            for candidate in (Path(p), folder / p):
                if candidate.exists():
                    return candidate
    return None


def _legacy(folder: Path, row: ResultRow) -> Path:
    # The demo before it ran the study's cells kept each run in <method>_sp<sparsity>/.
    return folder / f"{row.method}_sp{row.sparsity:g}"


def _mask_dir(folder: Path, row: ResultRow) -> Path | None:
    search = Path(row.search_checkpoint).parent / "masks" if row.search_checkpoint else None
    found = _existing(folder, search, _legacy(folder, row) / "masks")
    return found if found is not None and found.is_dir() else None


def _layer_table(folder: Path, row: ResultRow) -> list[tuple[str, int, int, float]] | None:
    path = _existing(folder, row.checkpoint, _legacy(folder, row) / "pruned_model.pt")
    if path is None or not path.is_file():
        return None
    try:
        saved = load_file(path)
        model = plain_model(saved) if isinstance(saved, dict) and "state_dict" in saved else saved
        return sparsity_table(model)[0]
    except (CheckpointError, KeyError, RuntimeError, ValueError):
        return None  # a checkpoint this version cannot rebuild: the plot goes without it


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _draw_figures(folder: Path, rows: Sequence[ResultRow], skip: set[str]) -> list[tuple[str, str]]:
    """The plots every report has, from the rows (means over seeds); those in ``skip`` are not drawn."""
    drawn: list[tuple[str, str]] = []
    # The selected runs: in a study the searches that were finetuned, not every gamma tried.
    pruned = [r for r in rows if r.selected and r.variant != "dense" and r.sparsity is not None]
    finals = [r for r in pruned if r.evaluated]
    dense = [r for r in rows if r.evaluated and r.variant == "dense"]
    methods = list(dict.fromkeys(r.method for r in pruned))
    sparsities = sorted({r.sparsity for r in pruned})

    def per(group: Sequence[ResultRow], method: str, sp: float) -> list[ResultRow]:
        return [r for r in group if r.method == method and r.sparsity == sp]

    if finals and "robust_vs_sparsity.png" not in skip:
        fig, ax = subplots(figsize=(5, 3.5))
        if dense and all(r.pgd_acc is not None for r in dense):
            ax.axhline(_mean([r.pgd_acc for r in dense]), color="grey", linestyle=":", label="dense PGD")
        for method in methods:
            points = [(sp, per(finals, method, sp)) for sp in sparsities if per(finals, method, sp)]
            xs = [sp for sp, _ in points]
            ax.plot(xs, [_mean([r.pgd_acc for r in g]) for _, g in points], marker="o", label=f"{method} PGD")
            if all(r.aa_acc is not None for _, g in points for r in g):
                ys = [_mean([r.aa_acc for r in g]) for _, g in points]
                ax.plot(xs, ys, marker="s", linestyle="--", label=f"{method} AutoAttack")
        ax.set_xlabel("sparsity (pruned fraction)")
        ax.set_ylabel("robust accuracy (mean over seeds)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "robust_vs_sparsity.png", dpi=120)
        drawn.append(("Robust accuracy against sparsity", "robust_vs_sparsity.png"))

    histories: dict[tuple[str, float], list[list[float]]] = {}  # one Hamming history per seed
    for r in pruned:
        masks = _mask_dir(folder, r)
        if masks is not None:
            histories.setdefault((r.method, r.sparsity), []).append(hamming_history(masks))
    if any(histories.values()) and "hamming_per_epoch.png" not in skip:
        fig, axes = subplots(1, len(sparsities), figsize=(4.5 * len(sparsities), 3.3), squeeze=False)
        for ax, sp in zip(axes[0], sparsities, strict=True):
            for method in methods:
                runs = [h for h in histories.get((method, sp), []) if h]
                if runs:
                    n = min(len(h) for h in runs)
                    ax.plot(
                        range(n), [_mean([h[i] for h in runs]) for i in range(n)], marker=".", label=method
                    )
            ax.set_title(f"sparsity {sp:g}")
            ax.set_xlabel("mask-search epoch")
            ax.set_ylabel("normalised Hamming to previous epoch")
            ax.set_yscale("symlog", linthresh=1e-4)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "hamming_per_epoch.png", dpi=120)
        drawn.append(("Mask stability: flips per epoch, base method against S2AP", "hamming_per_epoch.png"))

    sharp: list[tuple[str, float, list[float]]] = []  # (method, sparsity, lambda_max per seed)
    for sp in sparsities:
        for m in methods:
            values = [r.lambda_max for r in per(pruned, m, sp) if r.lambda_max is not None]
            if values:
                sharp.append((m, sp, values))
    if sharp and "lambda_max.png" not in skip:
        fig, ax = subplots(figsize=(5, 3.5))
        ax.bar(
            [f"{m}\n{sp:g}" for m, sp, _ in sharp],
            [_mean(v) for _, _, v in sharp],
            color=["tab:orange" if m.endswith("s2ap") else "tab:blue" for m, _, _ in sharp],
        )
        ax.set_ylabel("top Hessian eigenvalue (scores)")
        fig.tight_layout()
        fig.savefig(folder / "lambda_max.png", dpi=120)
        drawn.append(("Score-space sharpness after mask search", "lambda_max.png"))

    layer_tables = {}
    for method in methods:
        for sp in sparsities:
            for r in per(finals, method, sp):
                table = _layer_table(folder, r)
                if table:
                    layer_tables[f"{method} {sp:g}"] = table
                    break
    if layer_tables and "layer_sparsity.png" not in skip:
        fig, ax = subplots(figsize=(6, 3.5))
        for label, table in layer_tables.items():
            ax.plot(
                [t[0].removesuffix(".weight") for t in table], [t[3] for t in table], marker="o", label=label
            )
        ax.set_ylabel("sparsity per layer")
        ax.tick_params(axis="x", rotation=60)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "layer_sparsity.png", dpi=120)
        drawn.append(("Per-layer sparsity of the evaluated models", "layer_sparsity.png"))
    return drawn


def _method_name(hparams: Mapping[str, Any]) -> str:
    """The base method a record's hyper-parameters name: the ``method`` block, or older ``base_method``."""
    method = hparams.get("method")
    if isinstance(method, Mapping) and method.get("class_path"):
        try:
            return method_from_config(method).name
        except (ValueError, ImportError, TypeError):
            return str(method["class_path"]).rsplit(".", 1)[-1].lower()
    return str(hparams.get("base_method") or "")
