"""One result row type and one report writer for the demo, the study and `s2ap report`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from s2ap_lightning.analysis.report import (
    RESULT_COLUMNS,
    ResultRow,
    read_results_csv,
    record_row,
    write_report,
    write_results_csv,
)

ROOT = Path(__file__).resolve().parents[1]


def rows():
    common = {"seed": 1, "dataset": "digits", "threat": "linf eps 0.1", "n_test": 359, "n_aa": 100}
    return [
        ResultRow(variant="dense", sparsity=0.0, stage="pretrain", clean_acc=0.99, pgd_acc=0.86, aa_acc=0.85,
                  checks_passed=True, **common),
        ResultRow(base_method="hydra", variant="base", sparsity=0.9, finetune="plain", stage="finetune",
                  clean_acc=0.94, pgd_acc=0.7, aa_acc=0.66, checks_passed=True, lambda_max=7.9, **common),
        ResultRow(base_method="hydra", variant="s2ap", sparsity=0.9, gamma=0.01, finetune="plain",
                  stage="finetune", clean_acc=0.91, pgd_acc=0.69, aa_acc=0.64, checks_passed=False,
                  check_failures=["more_steps_not_higher: pgd_acc 0.69 vs 0.68", "autoattack_warnings: x"],
                  lambda_max=5.8, **common),
        ResultRow(base_method="hydra", variant="s2ap", sparsity=0.9, gamma=0.05, stage="search",
                  selected=False, val_mask_pgd_acc=0.5, **common),
    ]  # fmt: skip


def test_rows_survive_the_csv_unchanged(tmp_path):
    path = write_results_csv(rows(), tmp_path / "results.csv")
    with open(path) as fh:
        assert next(csv.reader(fh)) == RESULT_COLUMNS
    assert read_results_csv(path) == rows()
    assert [r.method for r in rows()] == ["dense", "hydra", "hydra+s2ap", "hydra+s2ap"]


def test_rows_of_older_versions_map_their_keys():
    # The demo's results.csv before it ran the study's cells: methods hydra and s2ap, gamma 0 for HYDRA.
    old_demo = {"method": "hydra", "sparsity": "0.9", "seed": "0", "gamma": "0.0", "clean_acc": "0.9",
                "pgd_acc": "0.8", "aa_acc": "", "checks_passed": "True", "lambda_max": "0.25"}  # fmt: skip
    row = ResultRow.from_dict(old_demo)
    assert (row.method, row.variant, row.gamma, row.stage, row.aa_acc) == (
        "hydra",
        "base",
        None,
        "finetune",
        None,
    )
    row = ResultRow.from_dict({**old_demo, "method": "s2ap", "gamma": "0.01"})
    assert (row.variant, row.gamma, row.base_method) == ("s2ap", 0.01, "")
    assert ResultRow.from_dict({**old_demo, "method": "dense", "gamma": ""}).variant == "dense"

    # A committed study cell, written before rows had a variant: `awp` flag, `cell` key, `kind`.
    path = ROOT / "results" / "digits" / "cells" / "seed1" / "finetune" / "hydra_sp0.99_s2ap.json"
    row = ResultRow.from_dict(json.loads(path.read_text()))
    assert (row.method, row.variant, row.gamma, row.finetune, row.stage) == (
        "hydra+s2ap",
        "s2ap",
        0.01,
        "plain",
        "finetune",
    )
    assert row.source == "seed1/finetune/hydra_sp0.99_s2ap" and row.seed == 1 and row.n_aa == 100
    base = json.loads(path.with_name("hydra_sp0.99_base.json").read_text())
    assert base["gamma"] == 0.0 and ResultRow.from_dict(base).gamma is None


def test_unknown_variant_or_finetune_arm_is_refused():
    with pytest.raises(ValueError, match=r"variant='sam' is unknown; valid: dense, base, s2ap"):
        ResultRow(variant="sam")
    with pytest.raises(ValueError, match=r"finetune='trades' is unknown; valid: plain, awp"):
        ResultRow(finetune="trades")


def test_the_report_tables_the_evaluated_rows_per_threat_model(tmp_path):
    other = ResultRow(base_method="hydra", variant="base", sparsity=0.9, seed=1, dataset="digits",
                      threat="linf eps 0.2", clean_acc=0.9, pgd_acc=0.5, checks_passed=True)  # fmt: skip
    text = write_report(tmp_path, [*rows(), other], title="t", intro=["how it was measured"]).read_text()
    assert text.startswith("# t\n") and "how it was measured" in text
    first = text.split("## dataset `digits`, linf eps 0.1\n\n")[1].split("\n\n")[0].splitlines()
    assert first[0].startswith(
        "| stage | base method | sparsity | variant | gamma | seed | finetune | clean |"
    )
    assert "run" not in first[0] and "mask PGD" not in first[0], "columns no row fills are left out"
    assert len(first) == 2 + 3, "the search that was not finetuned has no test figures: not tabled"
    assert "| finetune | hydra | 0.9 | s2ap | 0.01 | 1 | plain | 91.0 | 69.0 | 64.0 | 359 (100) |" in text
    assert "## dataset `digits`, linf eps 0.2" in text
    assert "**1 evaluation(s) FAILED a gradient-masking check:**" in text
    assert "more_steps_not_higher: pgd_acc 0.69 vs 0.68" in text
    assert (tmp_path / "robust_vs_sparsity.png").is_file() and (tmp_path / "lambda_max.png").is_file()


def test_a_test_record_is_a_row():
    record = {
        "stage": "ScoreSpaceSAMPruner",
        "checkpoint": "runs/s2ap/best.ckpt",
        "seed": "3",
        "clean_acc": 0.9,
        "pgd_acc": 0.6,
        "aa_acc": None,
        "n_images": 100,
        "n_aa_images": 0,
        "all_checks_passed": False,
        "checks": {"eps0_equals_clean": {"passed": False, "detail": "0.8 vs 0.9"}, "pgd": {"passed": True}},
        "protocol": {"eps": 0.05, "norm": "linf"},
        "dataset": {"dataset": "synthetic"},
        "hyper_parameters": {"sparsity": 0.8, "gamma": 0.01, "base_method": "hydra"},
    }
    row = record_row(record, "s2ap/best.eval.json")
    assert (row.method, row.sparsity, row.gamma, row.seed, row.threat) == (
        "hydra+s2ap",
        0.8,
        0.01,
        3,
        "linf eps 0.05",
    )
    assert row.check_failures == ["eps0_equals_clean: 0.8 vs 0.9"] and row.finetune == ""
    dense = record_row({**record, "stage": "RobustPretrainer", "hyper_parameters": {"eps": 0.05}}, "p.json")
    assert (dense.variant, dense.sparsity, dense.gamma) == ("dense", 0.0, None)
    finetuned = record_row({**record, "hyper_parameters": {"awp_gamma": 0.005}}, "f.json")
    assert (finetuned.variant, finetuned.finetune, finetuned.sparsity) == ("", "awp", None)


def test_a_collapsed_model_is_named_collapsed_not_failed_masking(tmp_path):
    common = {"seed": 1, "dataset": "digits", "threat": "linf eps 0.1", "n_test": 359, "n_aa": 100}
    down = ResultRow(base_method="hydra", variant="base", sparsity=0.999, finetune="plain", stage="finetune",
                     clean_acc=0.11, pgd_acc=0.11, aa_acc=0.1, checks_passed=False, check_failures=[],
                     collapsed=True, majority_class_rate=0.1, source="seed1/finetune/x", **common)  # fmt: skip
    assert not down.masking_failed and rows()[2].masking_failed
    path = write_results_csv([*rows(), down], tmp_path / "results.csv")
    assert read_results_csv(path)[-1] == down, "collapsed and majority_class_rate survive the CSV"
    text = write_report(tmp_path, [*rows(), down], title="t").read_text()
    line = next(row for row in text.splitlines() if "`seed1/finetune/x`" in row)
    assert line.endswith("| collapsed |")
    assert "**1 evaluation(s) FAILED a gradient-masking check:**" in text, "the collapsed one is not counted"

    # A record of `s2ap test`: the checks a collapsed model failed are not listed as masking.
    record = {
        "clean_acc": 0.1,
        "pgd_acc": 0.1,
        "collapsed": True,
        "majority_class_rate": 0.1,
        "all_checks_passed": False,
        "checks": {
            "more_steps_not_higher": {"passed": False, "verdict": "collapsed", "detail": "a"},
            "eps0_equals_clean": {"passed": False, "verdict": "failed", "detail": "b"},
        },
        "hyper_parameters": {"awp_gamma": 0.0},
    }
    row = record_row(record, "f.json")
    assert row.collapsed and row.majority_class_rate == 0.1
    assert row.check_failures == ["eps0_equals_clean: b"]
