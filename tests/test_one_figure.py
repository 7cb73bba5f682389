"""One evaluation, one figure: ``s2ap test``, the study (and so the demo, a study preset) and a
notebook's ``evaluate()`` give identical figures and checks for the same checkpoint, images and seed.

The study evaluates its finetuned models with ``evaluate()`` on in-memory tensors; ``s2ap test`` runs
the same function from the EvaluationCallback on the DataModule's test split; a notebook calls it on a
plain model loaded from the exported checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from s2ap_lightning.attacks import ThreatModel
from s2ap_lightning.checkpoint import load_file
from s2ap_lightning.cli import main
from s2ap_lightning.data import RobustDataModule, split_tensors
from s2ap_lightning.evaluation import EvalProtocol, evaluate
from s2ap_lightning.export import plain_model
from s2ap_lightning.jobs.study import Cell, StudySpec, read_result, run_study

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "configs" / "data_tiny.yaml"
SEED, AA = 1, 12


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    raw = yaml.safe_load((ROOT / "tests" / "configs" / "study_tiny.yaml").read_text())
    raw.update(data_config=str(DATA), out=str(tmp_path_factory.mktemp("study")), seeds=[SEED],
               gammas=[0.01], aa_images=AA, sharpness_images=0)  # fmt: skip
    spec = StudySpec(**raw)
    run_study(spec)
    return spec


@pytest.mark.parametrize("variant", ["base", "s2ap"])
def test_s2ap_test_the_study_and_evaluate_agree(study, variant, tmp_path):
    cell = read_result(study, Cell.finetune(SEED, "hydra", 0.8, variant))
    ckpt = Path(cell["checkpoint"])
    # s2ap test on the study's checkpoint, with the study's evaluation settings.
    code = main(
        ["test", "--config", str(DATA), "--model", "MaskedFinetuner", "--ckpt_path", str(ckpt),
         "--model.evaluation.pgd_steps", str(study.eval_pgd_steps), "--model.evaluation.aa_images", str(AA),
         "--model.evaluation.seed", str(SEED), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    record = json.loads(ckpt.with_suffix(".eval.json").read_text())
    # A notebook: evaluate() on the plain model of the same checkpoint and the same test images.
    data = RobustDataModule(**(yaml.safe_load(DATA.read_text())["data"]))
    data.setup("test")
    threat = ThreatModel(**record["threat_model"])
    notebook = evaluate(
        plain_model(load_file(ckpt)), split_tensors(data.test_set), threat,
        EvalProtocol(pgd_steps=study.eval_pgd_steps, aa_images=AA, seed=SEED),
    ).as_dict()  # fmt: skip
    for key in ("clean_acc", "pgd_acc", "aa_acc", "pgd_fewer_acc", "eps0_acc", "n_images", "n_aa_images"):
        assert record[key] == notebook[key], key
    assert record["checks"] == json.loads(json.dumps(notebook["checks"]))
    # The study's own row of this model.
    for key, mine in (
        ("clean_acc", "clean_acc"),
        ("pgd_acc", "pgd_acc"),
        ("aa_acc", "aa_acc"),
        ("n_aa_images", "n_aa"),
    ):
        assert cell[mine] == pytest.approx(record[key], abs=0), key
    assert cell["checks_passed"] == record["all_checks_passed"]
