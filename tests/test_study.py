"""The study command on a tiny spec: pairing, gamma selection on validation only, CI arithmetic,
resume after a kill, the submitit launcher."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from s2ap_lightning.jobs import study as study_mod
from s2ap_lightning.jobs.study import Cell, StudySpec, cells_of, choose_gamma, read_result, run_study
from s2ap_lightning.jobs.study_report import mean_ci, paired, verdict

ROOT = Path(__file__).resolve().parents[1]


def tiny_spec(out, **changes):
    raw = yaml.safe_load((ROOT / "tests" / "configs" / "study_tiny.yaml").read_text())
    raw["data_config"] = str(ROOT / raw["data_config"])
    raw.update(out=str(out), **changes)
    return StudySpec(**raw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    spec = tiny_spec(tmp_path_factory.mktemp("study"))
    run_study(spec)
    return spec


def test_every_method_of_a_seed_starts_from_the_same_pretrained_weights(finished):
    spec = finished
    for seed in spec.seeds:
        pre = read_result(spec, Cell("pretrain", seed))
        searches = [read_result(spec, c) for c in cells_of(spec)[1] if c.seed == seed]
        assert {s["init_sha256"] for s in searches} == {pre["weights_sha256"]}
        finals = [read_result(spec, c) for c in cells_of(spec)[2] if c.seed == seed]
        assert {f["init_sha256"] for f in finals} == {pre["weights_sha256"]}
    hashes = {read_result(spec, Cell("pretrain", s))["weights_sha256"] for s in spec.seeds}
    assert len(hashes) == len(spec.seeds), "each seed has its own pretraining"


def test_outputs_and_columns(finished):
    folder = finished.folder
    text = (folder / "study.md").read_text()
    assert "Paired difference" in text and "Gamma sensitivity" in text
    assert (folder / "robust_vs_sparsity.png").is_file() and (folder / "paired_per_seed.png").is_file()
    lines = (folder / "study.csv").read_text().splitlines()
    # dense per seed + (base + gammas) searches per seed
    assert len(lines) == 1 + len(finished.seeds) * (1 + 1 + len(finished.gammas))
    assert lines[0].startswith("seed,method,base_method,sparsity,gamma,selected,clean_acc,pgd_acc,aa_acc")


def test_gamma_is_chosen_on_validation_never_test(finished, tmp_path):
    spec = replace(finished, out=str(tmp_path))
    # Copy the search results and give the gammas opposite validation and test orderings.
    for cell in cells_of(finished)[1]:
        result = read_result(finished, cell)
        if cell.gamma:
            high_val = cell.gamma == spec.gammas[-1]
            result["val_mask_pgd_acc"] = 0.9 if high_val else 0.1
            result["mask_pgd_acc"] = 0.1 if high_val else 0.9  # test-side figure: must be ignored
        path = study_mod.result_path(spec, cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    gamma, scores = choose_gamma(spec, spec.seeds[0], "hydra", spec.sparsities[0])
    assert gamma == spec.gammas[-1] and scores[gamma] == 0.9


def test_interval_arithmetic_against_a_hand_computation():
    # values 1, 2, 3, 4: mean 2.5, sd sqrt(5/3), t_{0.975,3} = 3.182446305
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half == pytest.approx(3.182446305 * math.sqrt(5 / 3) / 2, rel=1e-6)
    assert math.isnan(mean_ci([0.3])[1])
    assert verdict(0.02, 0.01) == "S2AP better" and verdict(-0.02, 0.01) == "S2AP worse"
    assert verdict(0.005, 0.01) == "no detectable difference"
    rows = [
        {
            "selected": True,
            "base_method": "hydra",
            "sparsity": 0.9,
            "method": "hydra",
            "seed": 1,
            "pgd_acc": 0.5,
        },
        {
            "selected": True,
            "base_method": "hydra",
            "sparsity": 0.9,
            "method": "hydra+s2ap",
            "seed": 1,
            "pgd_acc": 0.6,
        },
        {
            "selected": False,
            "base_method": "hydra",
            "sparsity": 0.9,
            "method": "hydra+s2ap",
            "seed": 1,
            "pgd_acc": 0.9,
        },
    ]
    assert paired(rows, "hydra", 0.9, "pgd_acc") == {1: (0.5, 0.6)}


def test_killed_study_resumes_without_rerunning_finished_cells(finished, tmp_path, monkeypatch):
    spec = replace(finished, out=str(tmp_path), seeds=[1])
    real = study_mod.run_cell
    ran = []

    def killed_after_two(spec_, cell, ctx=None):
        if len(ran) == 2:
            # Half a cell: its run folder exists, its result does not.
            (spec_.folder / "runs" / cell.key).mkdir(parents=True, exist_ok=True)
            (spec_.folder / "runs" / cell.key / "best.ckpt").write_text("half-written")
            raise KeyboardInterrupt
        ran.append(cell.key)
        return real(spec_, cell, ctx)

    monkeypatch.setattr(study_mod, "run_cell", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec)
    assert (
        len(ran) == 2
        and (tmp_path / "runs" / "seed1" / "search" / "hydra_sp0.8_g0.01" / "best.ckpt").exists()
    )
    done_before = {
        c.key: study_mod.result_path(spec, c).stat().st_mtime_ns
        for w in cells_of(spec)
        for c in w
        if read_result(spec, c) is not None
    }
    assert len(done_before) == 2
    resumed = []

    def counting(spec_, cell, ctx=None):
        resumed.append(cell.key)
        return real(spec_, cell, ctx)

    monkeypatch.setattr(study_mod, "run_cell", counting)
    assert run_study(spec) is not None
    assert not set(resumed) & set(done_before), "finished cells were rerun"
    assert {
        c.key: study_mod.result_path(spec, c).stat().st_mtime_ns
        for w in cells_of(spec)
        for c in w
        if c.key in done_before
    } == done_before


def test_submitit_local_launcher_respects_dependencies(finished, tmp_path):
    pytest.importorskip("submitit")
    spec = replace(finished, out=str(tmp_path), seeds=[1], gammas=[0.01], launcher="submitit_local")
    run_study(spec)
    pre = read_result(spec, Cell("pretrain", 1))
    fin = read_result(spec, Cell("finetune", 1, "hydra", 0.8, 1.0))
    assert fin["init_sha256"] == pre["weights_sha256"]
    assert (tmp_path / "submitit").is_dir() and (tmp_path / "study.md").is_file()


def test_bad_spec_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=r"gammas=\[0.0\]"):
        tiny_spec(tmp_path, gammas=[0.0])
    with pytest.raises(ValueError, match=r"launcher='pbs' is unknown"):
        tiny_spec(tmp_path, launcher="pbs")
    with pytest.raises(ValueError, match=r"base_methods=\['obd'\]"):
        tiny_spec(tmp_path, base_methods=["obd"])
    with pytest.raises(ValueError, match=r"attack_precision='bf16' is unknown; valid: fp32, training"):
        tiny_spec(tmp_path, attack_precision="bf16")
    assert not any(tmp_path.iterdir())


def test_data_config_model_block_with_or_without_init_args(tmp_path):
    """`model: {eps: ...}` and `model: {init_args: {eps: ...}}` both set the study's threat model."""
    for block in ("model: {eps: 0.2, step_size: 0.05}", "model: {init_args: {eps: 0.2, step_size: 0.05}}"):
        path = tmp_path / "data.yaml"
        path.write_text(f"data: {{dataset: synthetic}}\n{block}\n")
        data, model = StudySpec(name="x", data_config=str(path)).data_settings()
        assert data == {"dataset": "synthetic"} and model == {"eps": 0.2, "step_size": 0.05}, block
