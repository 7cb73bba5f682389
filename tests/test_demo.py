"""``s2ap demo`` (the Quickstart's first command): a study preset at toy size, its table, no overwrite."""

from __future__ import annotations

import pytest

from s2ap_lightning.analysis.report import read_results_csv
from s2ap_lightning.cli import main
from s2ap_lightning.jobs import demo as demo_mod
from s2ap_lightning.jobs.cells import load_spec

TINY = [
    "--pretrain_epochs", "1", "--prune_epochs", "1", "--warmup_epochs", "0", "--finetune_epochs", "1",
    "--sparsities", "[0.9]", "--pgd_steps", "2", "--aa_images", "0", "--progress", "false",
]  # fmt: skip


def test_demo_options_keep_their_meaning_and_defaults(monkeypatch):
    """The demo's options map onto the study spec it runs; nothing is trained here."""
    captured = []
    monkeypatch.setattr(demo_mod, "run_preset", lambda spec, overwrite: captured.append((spec, overwrite)))
    assert main(["demo"]) == 0
    spec, overwrite = captured.pop()
    assert not overwrite and str(spec.folder) == "runs/demo" and spec.data_config is None
    assert spec.data_settings() == (
        {"dataset": "digits", "batch_size": 128},
        {"model": "mlp", "threat": {"eps": 0.1, "step_size": 0.025}},
    )
    assert (spec.base_methods, spec.sparsities, spec.gammas, spec.seeds) == (
        ["hydra"],
        [0.9, 0.99],
        [0.01],
        [0],
    )
    epochs = (spec.pretrain_epochs, spec.prune_epochs, spec.warmup_epochs, spec.finetune_epochs)
    assert epochs == (20, 10, 2, 8)
    assert (spec.eval_pgd_steps, spec.aa_images, spec.awp, spec.progress) == (20, 100, False, True)

    assert main(["demo", "--seed", "3", "--gamma", "0.05", "--pgd_steps", "5", "--overwrite", "true"]) == 0
    spec, overwrite = captured.pop()
    assert overwrite and (spec.seeds, spec.gammas, spec.eval_pgd_steps) == ([3], [0.05], 5)


def test_a_bad_demo_option_fails_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--sparsities", "[0.9, 1.5]"]) == 2
    assert "sparsities=[0.9, 1.5]: 1.5 is not valid" in capsys.readouterr().err
    assert not out.exists()


def test_the_old_import_path_names_the_new_one():
    with pytest.raises(ImportError, match=r"s2ap_lightning.jobs.demo.run_demo"):
        from s2ap_lightning.demo import DemoConfig  # noqa: F401


def test_demo_writes_its_table_and_refuses_to_overwrite_it(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    rows = read_results_csv(out / "results.csv")
    assert [(r.method, r.sparsity) for r in rows] == [("dense", 0), ("hydra", 0.9), ("hydra+s2ap", 0.9)]
    assert [(r.variant, r.gamma, r.finetune) for r in rows] == [
        ("dense", None, ""),
        ("base", None, "plain"),
        ("s2ap", 0.01, "plain"),
    ]
    assert all(0.0 <= r.clean_acc <= 1.0 and r.pgd_acc <= r.clean_acc and r.seed == 0 for r in rows)
    for r in rows[1:]:  # the masks keep 10 % of every layer: exact zeros in the evaluated network
        assert abs(r.global_sparsity - 0.9) < 1e-3
        assert (
            r.lambda_max is not None and r.mask_hamming_last_epoch is not None and r.mask_pgd_acc is not None
        )
    # The study's own cells ran it: the demo folder is a study folder.
    assert (
        load_spec(out).gammas == [0.01]
        and (out / "cells" / "seed0" / "finetune" / "hydra_sp0.9_s2ap.json").is_file()
    )
    assert (out / "runs" / "seed0" / "pretrain" / "best.ckpt").is_file()
    report = (out / "report.md").read_text()
    assert "## dataset `digits`, linf eps 0.1" in report and "| `seed0/finetune/hydra_sp0.9_s2ap` |" in report
    assert (out / "hamming_per_epoch.png").is_file() and (out / "lambda_max.png").is_file()
    table = printed[printed.index("method      sparsity") :]
    assert "lambda_max" in table and "\nhydra+s2ap       0.9 " in table and "\ndense              0 " in table

    # A second demo into the same folder is refused before any work, naming the folder; nothing changes.
    before = {
        p: p.read_bytes() for p in (out / "results.csv", out / "runs" / "seed0" / "pretrain" / "best.ckpt")
    }
    assert main(["demo", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"out={str(out)!r} already holds" in err and "--overwrite true" in err
    assert {p: p.read_bytes() for p in before} == before

    # Asked for explicitly, it replaces them: every cell runs again (nothing is resumed).
    stamp = (out / "cells" / "seed0" / "pretrain.json").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), "--overwrite", "true", *TINY]) == 0
    assert (out / "cells" / "seed0" / "pretrain.json").stat().st_mtime_ns != stamp
