"""Issue 20 without training: the grid of finetuning arms and extra seeds, collapsed models left out of
the paired reading (and counted), the regime curve, and old spec files that still name their cells."""

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from s2ap_lightning.analysis.report import ResultRow
from s2ap_lightning.cli import main
from s2ap_lightning.evaluation import write_record
from s2ap_lightning.jobs import study as study_mod
from s2ap_lightning.jobs.cells import Cell, StudySpec, cells_of, load_spec, result_path, save_spec, study_rows
from s2ap_lightning.jobs.study_report import collapse_point, collapsed_pairs, paired, write_study_report

ROOT = Path(__file__).resolve().parents[1]
DATA = str(ROOT / "tests" / "configs" / "data_tiny.yaml")


def test_arms_and_extra_seeds_make_the_grid():
    spec = StudySpec(
        data_config=DATA,
        sparsities=[0.99, 0.998],
        gammas=[0.01, 0.05],
        seeds=[1, 2],
        extra_seeds={0.998: [3, 4]},
        finetune_arms=["plain", "awp"],
    )
    pretrain, search, finetune = cells_of(spec)
    assert [c.seed for c in pretrain] == [1, 2, 3, 4], "one pretraining per seed, extra seeds included"
    assert spec.seeds_at(0.99) == [1, 2] and spec.seeds_at(0.998) == [1, 2, 3, 4]
    # (2 seeds at 0.99 + 4 at 0.998) x (base + 2 gammas); x 2 variants x 2 arms
    assert len(search) == 6 * 3 and len(finetune) == 6 * 2 * 2
    assert not [c for c in search + finetune if c.seed in (3, 4) and c.sparsity == 0.99]
    keys = {c.key for c in finetune}
    assert {"seed3/finetune/hydra_sp0.998_base_plain", "seed3/finetune/hydra_sp0.998_s2ap_awp"} <= keys
    # The two arms of a pair finetune the same searches (the S2AP gamma is chosen once, before finetuning).
    plain, awp = (Cell.finetune(3, "hydra", 0.998, "s2ap", a) for a in ("plain", "awp"))
    assert study_mod.depends_on(plain, spec) == study_mod.depends_on(awp, spec)
    assert (plain.arm_of(spec), awp.arm_of(spec)) == ("plain", "awp")


def test_an_old_spec_file_with_the_awp_flag_keeps_its_cell_names(tmp_path):
    """A study folder written before the arms (`awp: true`, no finetune_arms) resumes into its own cells."""
    (tmp_path / "spec.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "old",
                "data_config": DATA,
                "sparsities": [0.9],
                "gammas": [0.01],
                "seeds": [1],
                "awp": True,
                "awp_gamma": 0.01,
                "some_key_of_an_older_version": 3,
            }  # fmt: skip
        )
    )
    spec = load_spec(tmp_path)
    assert spec.arms == ["awp"] and spec.finetune_arms is None
    finetune = cells_of(spec)[2]
    assert [c.key for c in finetune] == ["seed1/finetune/hydra_sp0.9_base", "seed1/finetune/hydra_sp0.9_s2ap"]
    assert {c.arm_of(spec) for c in finetune} == {"awp"}
    assert load_spec(save_spec(spec).parent).arms == ["awp"], "written back, it reads the same"


def test_new_keys_from_the_command_line(tmp_path, monkeypatch):
    captured = []
    monkeypatch.setattr(study_mod, "run_study", captured.append)
    config = str(ROOT / "tests" / "configs" / "study_tiny.yaml")
    argv = ["study", "--config", config, "--out", str(tmp_path), "--finetune_arms", "[plain, awp]"]
    argv += ["--extra_seeds", "{0.8: [3, 4]}", "--workers", "2", "--method_options", "{hydra: {}}"]
    assert main(argv) == 0
    (spec,) = captured
    assert spec.arms == ["plain", "awp"] and spec.extra_seeds == {0.8: [3, 4]} and spec.workers == 2
    assert spec.all_seeds == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- collapsed models, regime
def fake_study(spec, clean, down):
    """Cell results of a finished study without training.

    ``clean(seed, sparsity, variant, arm)`` is the clean accuracy (PGD 30 points lower, AutoAttack 32);
    ``down(...)`` whether the model collapsed (its masking checks then fail, as a constant answer's do).
    """
    common = {"dataset": "synthetic", "threat": "linf eps 0.1", "n_test": 200, "n_aa": 200}

    def put(cell, row, **extras):
        write_record(
            result_path(spec, cell), {**row.as_dict(), **extras, "cell": cell.key, "kind": cell.kind}
        )

    def figures(acc, collapsed):
        return {"clean_acc": acc, "pgd_acc": acc - 0.3, "aa_acc": acc - 0.32, "checks_passed": not collapsed,
                "collapsed": collapsed, "majority_class_rate": 0.1}  # fmt: skip

    pretrain, search, finetune = cells_of(spec)
    for c in pretrain:
        put(c, ResultRow(seed=c.seed, variant="dense", sparsity=0.0, stage="pretrain", **common,
                         **figures(0.98, False)), weights_sha256="w")  # fmt: skip
    for c in search:
        row = ResultRow(seed=c.seed, base_method=c.base_method, variant=c.variant, sparsity=c.sparsity,
                        gamma=c.gamma or None, stage="search", selected=False, val_mask_pgd_acc=0.5,
                        n_val=50, **common)  # fmt: skip
        put(c, row, init_sha256="w")
    for c in finetune:
        gamma = spec.gammas[0] if c.variant == "s2ap" else 0.0
        searched = Cell.search(c.seed, c.base_method, c.sparsity, gamma)
        arm = c.arm_of(spec)
        collapsed = down(c.seed, c.sparsity, c.variant, arm)
        acc = 0.11 if collapsed else clean(c.seed, c.sparsity, c.variant, arm)
        row = ResultRow(seed=c.seed, base_method=c.base_method, variant=c.variant, sparsity=c.sparsity,
                        gamma=gamma or None, finetune=arm, stage="finetune", **common,
                        **figures(acc, collapsed))  # fmt: skip
        put(c, row, search_cell=searched.key, init_sha256="w")


@pytest.fixture
def collapsing(tmp_path):
    spec = StudySpec(
        data_config=DATA,
        out=str(tmp_path),
        sparsities=[0.99, 0.998, 0.999],
        gammas=[0.01],
        seeds=[1, 2, 3, 4],
        extra_seeds={0.998: [5, 6]},
        finetune_arms=["plain", "awp"],
    )
    rng = np.random.default_rng(0)
    noise = {(s, sp, v, a): 0.01 * rng.standard_normal() for s in range(1, 7) for sp in spec.sparsities
             for v in ("base", "s2ap") for a in ("plain", "awp")}  # fmt: skip

    def clean(seed, sp, variant, arm):
        return 0.9 - 10 * (sp - 0.99) + (0.03 if variant == "s2ap" else 0.0) + noise[seed, sp, variant, arm]

    def down(seed, sp, variant, arm):
        # 0.999: every base model and half the S2AP ones; 0.998: seed 5's base model, plain arm only.
        return (sp == 0.999 and (variant == "base" or seed % 2 == 0)) or (seed, sp, variant, arm) == (
            5, 0.998, "base", "plain")  # fmt: skip

    save_spec(spec)
    fake_study(spec, clean, down)
    return spec


def test_collapsed_pairs_are_left_out_of_the_paired_reading_and_counted(collapsing):
    spec = collapsing
    rows = study_rows(spec)
    plain = paired(rows, "hydra", 0.998, "pgd_acc", "plain")
    assert sorted(plain) == [1, 2, 3, 4, 6], "seed 5's base model collapsed: its pair is left out"
    assert sorted(paired(rows, "hydra", 0.998, "pgd_acc", "plain", keep_collapsed=True)) == [1, 2, 3, 4, 5, 6]
    assert sorted(paired(rows, "hydra", 0.998, "pgd_acc", "awp")) == [1, 2, 3, 4, 5, 6]
    assert (
        collapsed_pairs(rows, "hydra", 0.998, "plain") == 1
        and collapsed_pairs(rows, "hydra", 0.998, "awp") == 0
    )
    assert (
        paired(rows, "hydra", 0.999, "pgd_acc", "plain") == {}
        and collapsed_pairs(rows, "hydra", 0.999, "awp") == 4
    )
    assert collapse_point(rows, "hydra", "plain", spec.sparsities) == (0.999, 4, 4)

    text = write_study_report(spec).read_text()
    assert "plus 2.0 points (`collapse_margin` 0.02)" in text, "the margin is stated"
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("| hydra | plain | 0.998 | pgd |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells[4].split(", ")) == 5 and cells[6] == "5/5" and cells[7] == "1", cells
    assert (
        next(line for line in lines if line.startswith("| hydra | awp | 0.998 | pgd |")).split("|")[8].strip()
        == "0"
    )
    assert "| hydra | plain | 0.999 | all | - | - | - | 4 | every pair has a collapsed member" in text
    # The accuracy table counts the collapsed models; the per-run table names them; no masking failure.
    assert "| hydra | plain | 0.999 | 4 | 11.0 ± 0.0 |" in text and "| 4 | ok |" in text
    assert (
        sum(line.endswith("| collapsed |") for line in lines) == 4 * 2 + 2 * 2 + 1
    )  # 0.999: base x 2 arms, seeds 2 and 4 S2AP; seed 5
    assert "FAILED a gradient-masking check" not in text
    assert "**13 finetuned model(s) collapsed**" in text
    # The regime: a figure, and a reading per arm with the collapse point and the sparsity before it.
    assert "![regime](regime.png)" in text and (spec.folder / "regime.png").stat().st_size > 10_000
    reading = next(line for line in lines if line.startswith("- `hydra`, plain finetuning:"))
    assert (
        "collapse point 0.999 (4 of 4 base models collapsed; the sparsity just before it: 0.998)" in reading
    )
    assert re.search(
        r"PGD 0.99: \+\d\.\d ± \d\.\d \(4 pairs, S2AP better\); 0.998: \+\d\.\d ± \d\.\d \(5 pairs,", reading
    )
    awp = next(line for line in lines if line.startswith("- `hydra`, awp finetuning:"))
    assert "(6 pairs, S2AP better)" in awp
    # The gamma table: one value per seed of that sparsity (extra seeds at 0.998).
    assert "| hydra | 0.998 | 0.01 | 6 | 50.0, 50.0, 50.0, 50.0, 50.0, 50.0 | 50.0 | 6 |" in text


def test_no_collapse_is_stated_as_such(tmp_path):
    spec = StudySpec(data_config=DATA, out=str(tmp_path), sparsities=[0.9], gammas=[0.01], seeds=[1, 2, 3])
    save_spec(spec)
    fake_study(spec, lambda s, sp, v, a: 0.8 + 0.01 * s + (0.01 if v == "s2ap" else 0), lambda *a: False)
    text = write_study_report(spec).read_text()
    assert (
        "- `hydra`, plain finetuning: no collapse point up to 0.9. PGD 0.9: +1.0 ± 0.0 (3 pairs, S2AP better)"
        in text
    )
    assert (
        "collapsed member"
        not in text.split("## Paired difference")[1].split("## Gamma")[0].split("\n\n", 2)[2]
    )


def test_collapsed_models_below_the_collapse_rule_are_named(tmp_path):
    """One base model of three collapsed: no collapse point (the rule needs half), but it is said."""
    spec = StudySpec(
        data_config=DATA, out=str(tmp_path), sparsities=[0.9, 0.99], gammas=[0.01], seeds=[1, 2, 3]
    )
    save_spec(spec)
    fake_study(spec, lambda s, sp, v, a: 0.8, lambda s, sp, v, a: (s, sp, v) == (3, 0.99, "base"))
    reading = next(
        line
        for line in write_study_report(spec).read_text().splitlines()
        if line.startswith("- `hydra`, plain")
    )
    assert reading.startswith(
        "- `hydra`, plain finetuning: no collapse point up to 0.99 (fewer than half of the base models "
        "collapsed: 1 of 3 at 0.99)."
    ), reading


def preset(name):
    from s2ap_lightning.tools import run_tool

    spec = run_tool(StudySpec, ["--config", str(ROOT / "configs" / "study" / f"{name}.yaml")], "study")
    spec.data_settings()  # the data config and its keys exist
    return spec


def test_the_issue_20_presets_ask_for_what_the_issue_asks(monkeypatch):
    monkeypatch.chdir(ROOT)  # data_config paths are relative to the repository, as `s2ap study` runs them
    digits = preset("digits_mlp")
    assert digits.model == "mlp" and digits.data["dataset"] == "digits" and digits.eps == 0.1
    assert {0.99, 0.995, 0.998} <= set(digits.sparsities) and max(digits.sparsities) > 0.998, "past collapse"
    assert len(digits.seeds_at(0.998)) >= 20 and min(len(digits.seeds_at(s)) for s in digits.sparsities) >= 10
    assert digits.gammas == [0.001, 0.005, 0.01, 0.05] and digits.aa_images >= 359, (
        "AutoAttack on every image"
    )
    harp = preset("digits_harp")
    assert harp.base_methods == ["harp"] and len(harp.sparsities) == 1 and len(harp.seeds) >= 10
    mnist = preset("mnist_5k_strong")
    assert mnist.data_settings()[0]["dataset"] == "mnist_5k" and len(mnist.seeds) >= 5
    for spec in (digits, harp, mnist):
        assert spec.arms == ["plain", "awp"] and spec.workers == 2 and spec.launcher == "local"
        text = (ROOT / "configs" / "study" / f"{spec.name}.yaml").read_text()
        assert "Sizing" in text and "/ 2 workers" in text, "the sizing arithmetic heads the preset"


def test_every_spec_key_is_in_the_readme_table():
    from dataclasses import fields

    section = (
        (ROOT / "README.md").read_text().split("\n## Does S2AP help? `s2ap study`\n", 1)[1].split("\n## ")[0]
    )
    table = section.split("**Spec keys**", 1)[1].split("\n\n", 2)[1]
    named = {key for line in table.splitlines() for key in re.findall(r"`(\w+)`", line.split("|")[1])}
    assert {f.name for f in fields(StudySpec)} <= named, sorted({f.name for f in fields(StudySpec)} - named)
