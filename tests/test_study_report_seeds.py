"""study.md with too few seeds prints the mean and why there is no interval; README's own-data study spec."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

from s2ap_lightning.cli import main
from s2ap_lightning.jobs import study as study_mod
from s2ap_lightning.jobs.study import Cell, StudySpec, cells_of, result_path
from s2ap_lightning.jobs.study_report import interval_text, mean_ci, verdict, write_study_report

ROOT = Path(__file__).resolve().parents[1]
TOO_FEW = "n/a (2 seeds: too few for an interval)"


def test_two_seeds_print_the_mean_and_no_interval():
    diffs = [0.05, -0.32]  # S2AP minus base, per seed: ordinary seed noise of a small model
    mean, half = mean_ci(diffs)
    assert 100 * half > 200  # what study.md used to print: "-13.5 ± 235.1" points
    assert interval_text(diffs, signed=True) == f"-13.5 ± {TOO_FEW}"
    assert interval_text([0.71, 0.69]) == f"70.0 ± {TOO_FEW}"
    assert interval_text([0.7]) == "70.0 ± n/a (1 seed: too few for an interval)"
    assert interval_text([]) == "n/a"
    assert verdict(mean, half, len(diffs)) == "too few seeds to tell"


def test_ten_seeds_print_the_interval():
    rng = np.random.default_rng(0)
    diffs = list(0.03 + 0.02 * rng.standard_normal(10))
    mean, half = mean_ci(diffs)
    assert interval_text(diffs, signed=True) == f"{100 * mean:+.1f} ± {100 * half:.1f}"
    assert 0 < 100 * half < 5
    assert verdict(mean, half, 10) == verdict(mean, half) == "S2AP better"


def test_an_interval_wider_than_the_accuracy_scale_is_not_printed():
    diffs = [0.9, -0.9, 0.0]  # 3 seeds, but a half-width of 224 points
    assert 100 * mean_ci(diffs)[1] > 100
    text = interval_text(diffs, signed=True)
    assert text == "+0.0 ± n/a (3 seeds: interval wider than the accuracy range)"
    assert verdict(*mean_ci(diffs), 3) == "interval too wide to tell"


def write_fake_study(spec, pgd):
    """Result files of every cell in the format studies wrote before the result rows had a ``variant``
    (so the report reads old study folders); ``pgd[seed] = (base, s2ap)``."""

    def put(cell, **result):
        path = result_path(spec, cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        common = {"cell": cell.key, "seed": cell.seed, "wall_s": 1.0, "git_commit": "test"}
        path.write_text(json.dumps({**common, **result}))

    evaluation = {"n_test": 100, "n_aa": 0, "checks_passed": True, "check_failures": []}
    pretrain, search, finetune = cells_of(spec)
    for cell in pretrain:
        put(
            cell,
            method="dense",
            base_method="",
            sparsity=0.0,
            gamma=None,
            clean_acc=0.9,
            pgd_acc=0.6,
            aa_acc=None,
            **evaluation,
        )
    for cell in search:
        method = f"{cell.base_method}+s2ap" if cell.gamma else cell.base_method
        put(
            cell,
            method=method,
            base_method=cell.base_method,
            sparsity=cell.sparsity,
            gamma=cell.gamma,
            val_mask_pgd_acc=0.5,
            n_val=50,
            mask_hamming_last_epoch=0.01,
            lambda_max=1.0,
        )
    for cell in finetune:
        s2ap = cell.variant == "s2ap"
        gamma = spec.gammas[0] if s2ap else 0.0
        searched = Cell.search(cell.seed, cell.base_method, cell.sparsity, gamma)
        put(
            cell,
            search_cell=searched.key,
            method=f"hydra{'+s2ap' if s2ap else ''}",
            base_method=cell.base_method,
            sparsity=cell.sparsity,
            gamma=gamma,
            clean_acc=0.8,
            pgd_acc=pgd[cell.seed][1 if s2ap else 0],
            aa_acc=None,
            mask_pgd_acc=0.4,
            **evaluation,
        )


@pytest.mark.parametrize("seeds", [[1, 2], list(range(1, 11))])
def test_study_md_with_two_and_ten_seeds(tmp_path, seeds):
    spec = StudySpec(
        data_config=str(ROOT / "tests" / "configs" / "data_tiny.yaml"),
        out=str(tmp_path),
        sparsities=[0.9],
        gammas=[0.01],
        seeds=seeds,
    )
    rng = np.random.default_rng(1)
    pgd = {s: (0.40 + 0.1 * rng.random(), 0.40 + 0.1 * rng.random()) for s in seeds}
    if len(seeds) == 2:
        pgd = {1: (0.40, 0.45), 2: (0.50, 0.18)}  # differences +5 and -32 points
    write_fake_study(spec, pgd)
    text = write_study_report(spec).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| hydra | plain | 0.9 | pgd |"))
    half_widths = [float(h) for h in re.findall(r"± (\d+\.\d)", text)]
    if len(seeds) == 2:
        assert f"-13.5 ± {TOO_FEW}" in row and "too few seeds to tell" in row
        assert not half_widths, "no interval at all is printed with 2 seeds"
        assert f"| hydra | plain | 0.9 | 2 | 80.0 ± {TOO_FEW} |" in text
    else:
        assert half_widths and max(half_widths) < 10, half_widths
        assert TOO_FEW not in text and "too few seeds" not in row


# ----------------------------------------------------------------------------- README's own-data study
def readme_section(title):
    text = (ROOT / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def write_png_folder(root, classes=2, per_class=3, size=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_readme_own_data_study_spec_parses_and_builds_the_datamodule(tmp_path, monkeypatch):
    import torch

    from s2ap_lightning.data import RobustDataModule
    from s2ap_lightning.models import build_model

    section = readme_section("Your own data")
    block = re.search(r"```yaml\n(# my_data.yaml\n.*?)```", section, re.S).group(1)
    config = yaml.safe_load(block)
    assert config["data"]["dataset"] == "imagefolder" and config["data"]["data_dir"] == "mydata"
    write_png_folder(tmp_path / "mydata")
    monkeypatch.chdir(tmp_path)  # data_dir "mydata" is relative, as in the README
    (tmp_path / "my_data.yaml").write_text(block)

    # The README's command, through the study's own argument parser (the run itself is replaced).
    command = re.search(r"```bash\n(s2ap study --data_config.*?)```", section, re.S).group(1)
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["s2ap", "study"]
    captured = []
    monkeypatch.setattr(study_mod, "run_study", captured.append)
    assert main(argv[1:]) == 0
    (spec,) = captured
    assert spec.data_config == "my_data.yaml" and spec.seeds == [1, 2, 3, 4, 5]
    assert spec.sparsities == [0.9] and spec.gammas == [0.001, 0.01, 0.05] and spec.workers == 2

    data_kw, model_kw = spec.data_settings()
    assert data_kw == {"dataset": "imagefolder", "data_dir": "mydata", "batch_size": 64}
    assert model_kw == {"model": "mlp", "threat": {"eps": 0.1, "step_size": 0.025, "steps": 10}}
    dm = RobustDataModule(**data_kw)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (2, 3, 12)
    # The MLP's first layer is sized by the folder's images, as the study's cells build it.
    net = build_model(model_kw["model"], dm.num_classes, dm.in_channels, image_size=dm.image_size)
    assert net.eval()(torch.zeros(2, dm.in_channels, dm.image_size, dm.image_size)).shape == (2, 2)


# ----------------------------------------------------------------------------- older study folders
def test_a_committed_study_folder_of_an_older_version_is_reported_with_the_same_figures(tmp_path, capsys):
    """results/digits was written before result rows named their variant: `s2ap report` still reads it."""
    import shutil

    from s2ap_lightning.analysis.report import read_results_csv

    committed = ROOT / "results" / "digits"
    shutil.copytree(committed / "cells", tmp_path / "cells")
    shutil.copy(committed / "spec.yaml", tmp_path / "spec.yaml")
    assert main(["report", str(tmp_path)]) == 0

    def table(text, heading):
        block = text.split(heading)[1].split("\n## ")[0]
        lines = [line for line in block.splitlines() if line.startswith("| ")][1:]  # rows without the header
        return [[c.strip() for c in line.strip("|").split("|")] for line in lines]

    old, new = (committed / "study.md").read_text(), (tmp_path / "study.md").read_text()
    # The same figures, now with the finetuning arm (plain: the folder's awp: false) and a collapsed
    # count (0: its records predate the flag); the gamma table lists the seeds' values in one column.
    accuracy = {(r[0], r[1]): r[2:] for r in table(old, "## Accuracy per method")}
    assert {
        (r[0], r[2]): [r[3], r[4], r[5], r[6], r[8]] for r in table(new, "## Accuracy per method")
    } == accuracy
    assert {r[1] for r in table(new, "## Accuracy per method")} == {"-", "plain"}
    paired_old = {(r[0], r[1], r[2]): r[3:] for r in table(old, "## Paired difference")}
    paired_new = {(r[0], r[2], r[3]): [*r[4:7], r[8]] for r in table(new, "## Paired difference")}
    assert paired_new == paired_old and {r[1] for r in table(new, "## Paired difference")} == {"plain"}
    gammas_old = {
        (r[0], r[1], r[2]): [", ".join(r[3:8]), r[8], r[9]] for r in table(old, "## Gamma sensitivity")
    }
    assert {(r[0], r[1], r[2]): r[4:] for r in table(new, "## Gamma sensitivity")} == gammas_old
    assert table(new, "## Mask statistics") == table(old, "## Mask statistics")
    rows = read_results_csv(tmp_path / "study.csv")
    finals = [r for r in rows if r.selected and r.variant != "dense"]
    assert len(rows) == 5 * (1 + 2 * 5) and len(finals) == 5 * 2 * 2
    assert {r.gamma for r in finals if r.variant == "base"} == {None}, "gamma is S2AP's radius only"
    assert {r.gamma for r in finals if r.variant == "s2ap"} <= {0.001, 0.005, 0.01, 0.05}
    assert {(r.stage, r.finetune) for r in finals} == {("finetune", "plain")}
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2, "an existing study.md is not replaced without --overwrite"
    assert "study.md" in capsys.readouterr().err
