"""The Quickstart job: a one-seed study on scikit-learn's digits, HYDRA against S2AP.

The demo is a :class:`~s2ap_lightning.jobs.cells.StudySpec` preset run through the study's own cells:
one robust pretraining, per sparsity a HYDRA and an S2AP mask search from that same pretrained model,
the finetuning of each, and the evaluation protocol on the finetuned models (clean, PGD, AutoAttack
standard on a fixed test subset, the gradient-masking checks). With one gamma there is nothing to
select. It writes ``results.csv`` and ``report.md`` (the shared writers) and prints its own table.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence

from s2ap_lightning.analysis.report import ResultRow, write_report, write_results_csv
from s2ap_lightning.jobs.cells import StudySpec, save_spec, study_rows
from s2ap_lightning.jobs.study import run_local

#: The demo's data: the bundled 8x8 digits (no download), batches of 128.
DEMO_DATA = {"dataset": "digits", "batch_size": 128}


def run_demo(
    out: str = "runs/demo",
    model: str = "mlp",
    seed: int = 0,
    sparsities: tuple[float, ...] = (0.9, 0.99),
    gamma: float = 0.01,
    pretrain_epochs: int = 20,
    prune_epochs: int = 10,
    warmup_epochs: int = 2,
    finetune_epochs: int = 8,
    eps: float = 0.1,
    step_size: float = 0.025,
    pgd_steps: int = 20,
    aa_images: int = 100,
    progress: bool = True,
    overwrite: bool = False,
) -> list[ResultRow]:
    """Run the Quickstart demo: robust pretraining, HYDRA and S2AP mask searches, finetuning, evaluation.

    The defaults finish in a few minutes on a 2-core CPU. Returns the rows of ``results.csv``: the
    dense model, then per sparsity HYDRA and S2AP on HYDRA.

    Args:
        out: output folder (results.csv, report.md, the study's cells/ and runs/).
        model: architecture (``mlp``: every layer large enough to keep 1 % of it).
        seed: seed of every stage and of the evaluation's AutoAttack sample.
        sparsities: pruned fractions (0.9 keeps 10 % of every layer).
        gamma: S2AP's relative score-space radius.
        pretrain_epochs: epochs of robust pretraining.
        prune_epochs: epochs of each mask search.
        warmup_epochs: plain HYDRA epochs before S2AP starts.
        finetune_epochs: epochs of finetuning, the same for both methods.
        eps: L-inf budget on [0, 1] pixels.
        step_size: PGD step size.
        pgd_steps: PGD steps of the test evaluation (and of the validation figure of each mask).
        aa_images: test images attacked by AutoAttack (class-stratified, seeded).
        progress: progress bars inside stages.
        overwrite: write into an ``out`` that already holds files (a previous demo's results and
            checkpoints are replaced); by default such a folder is refused.

    """
    spec = StudySpec(
        name="demo",
        data_config=None,
        data=dict(DEMO_DATA),
        model=model,
        eps=eps,
        step_size=step_size,
        out=out,
        base_methods=["hydra"],
        sparsities=list(sparsities),
        gammas=[gamma],
        seeds=[seed],
        pretrain_epochs=pretrain_epochs,
        prune_epochs=prune_epochs,
        warmup_epochs=warmup_epochs,
        finetune_epochs=finetune_epochs,
        pretrain_lr=0.1,
        prune_lr=0.1,
        finetune_lr=0.01,
        select_pgd_steps=pgd_steps,
        eval_pgd_steps=pgd_steps,
        aa_images=aa_images,
        sharpness_images=256,
        sharpness_iters=20,
        progress=progress,
    )
    return run_preset(spec, overwrite)


def run_preset(spec: StudySpec, overwrite: bool = False) -> list[ResultRow]:
    """Run a study spec from scratch in ``spec.folder`` as the demo does, and print its table.

    A folder that already holds files is refused unless ``overwrite``: the study would resume from
    its cells instead of running the settings given, and a new run replaces the old one's files.
    """
    out = spec.folder
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise FileExistsError(
            f"out={str(out)!r} already holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''}; "
            "choose another --out or pass --overwrite true to replace a previous demo's results"
        )
    spec.data_settings()  # the data settings are checked before anything is written or removed
    for previous in ("cells", "runs"):
        # Asked for explicitly: the previous results go, so that every cell runs with these settings.
        shutil.rmtree(out / previous, ignore_errors=True)
    started = time.time()
    save_spec(spec)
    run_local(spec)
    rows = [r for r in study_rows(spec) if r.selected]
    write_results_csv(rows, out / "results.csv")
    report = write_report(
        out,
        rows,
        title=f"s2ap demo: `{out}`",
        intro=[_protocol_note(spec, rows)],
    )
    print(f"\nfinished in {time.time() - started:.0f} s\n")
    print(format_table(rows))
    for r in rows:
        for failure in r.check_failures:
            print(f"EVALUATION CHECK FAILED ({r.method}, sparsity {r.sparsity:g}): {failure}")
        if r.collapsed:
            print(
                f"COLLAPSED ({r.method}, sparsity {r.sparsity:g}): clean accuracy {r.clean_acc:.3f} is "
                f"within {spec.collapse_margin:.2f} of the majority-class rate {r.majority_class_rate:.3f}"
            )
    print(f"\n{_protocol_note(spec, rows)} Results: {out / 'results.csv'}; report with plots: {report}")
    return rows


def _protocol_note(spec: StudySpec, rows: Sequence[ResultRow]) -> str:
    n_test = rows[0].n_test if rows else None
    n_aa = rows[0].n_aa if rows else None
    seed = spec.seeds[0]
    return (
        f"PGD-{spec.eval_pgd_steps} and clean accuracy on all {n_test} test images; AutoAttack standard "
        f"on a class-stratified sample of {n_aa} (seed {seed}); gradient-masking checks on the same "
        f"images. One seed: the table shows the pipeline working, not which method is better "
        f"(`s2ap study` compares them over seeds)."
    )


def _num(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{'-':>{width}}" if value is None else format(value, ">" + spec)


def _checks(row: ResultRow) -> str:
    # A collapsed model answers one class: its failed checks are expected, not a sign of masking.
    if row.collapsed:
        return "collapsed"
    return "ok" if row.checks_passed is not False else "FAILED"


def format_table(rows: Sequence[ResultRow]) -> str:
    """The demo's table: per (method, sparsity) the test figures, the mask's, and the checks."""
    head = (
        f"{'method':<11} {'sparsity':>8} {'clean':>7} {'PGD':>7} {'AA':>7} {'mask PGD':>9} {'hamming':>8} "
        f"{'lambda_max':>10} {'checks':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        aa = "n/a" if r.aa_acc is None else f"{r.aa_acc:.3f}"
        lines.append(
            f"{r.method:<11} {r.sparsity:>8g} {r.clean_acc:>7.3f} {r.pgd_acc:>7.3f} {aa:>7} "
            f"{_num(r.mask_pgd_acc, '9.3f')} {_num(r.mask_hamming_last_epoch, '8.4f')} "
            f"{_num(r.lambda_max, '10.4g')} "
            f"{_checks(r):>7}"
        )
    return "\n".join(lines)
