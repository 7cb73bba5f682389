"""The study command on a tiny spec: pairing, gamma selection on validation only, CI arithmetic,
resume after a kill, the submitit launcher."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from s2ap_lightning.analysis.report import ResultRow
from s2ap_lightning.cli import main
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
        pre = read_result(spec, Cell.pretrain(seed))
        searches = [read_result(spec, c) for c in cells_of(spec)[1] if c.seed == seed]
        assert {s["init_sha256"] for s in searches} == {pre["weights_sha256"]}
        finals = [read_result(spec, c) for c in cells_of(spec)[2] if c.seed == seed]
        assert {f["init_sha256"] for f in finals} == {pre["weights_sha256"]}
    hashes = {read_result(spec, Cell.pretrain(s))["weights_sha256"] for s in spec.seeds}
    assert len(hashes) == len(spec.seeds), "each seed has its own pretraining"


def test_outputs_and_columns(finished):
    folder = finished.folder
    text = (folder / "study.md").read_text()
    assert "Paired difference" in text and "Gamma sensitivity" in text
    assert (folder / "robust_vs_sparsity.png").is_file() and (folder / "paired_per_seed.png").is_file()
    lines = (folder / "study.csv").read_text().splitlines()
    # dense per seed + (base + gammas) searches per seed
    assert len(lines) == 1 + len(finished.seeds) * (1 + 1 + len(finished.gammas))
    assert lines[0].startswith(
        "seed,method,base_method,variant,sparsity,gamma,finetune,stage,selected,clean_acc,pgd_acc,aa_acc"
    )
    # The per-run table of the shared report writer, one per dataset and evaluated threat model.
    assert "## dataset `synthetic`, linf eps 0.1" in text and "`seed1/finetune/hydra_sp0.8_s2ap`" in text


def test_cell_results_name_the_variant_and_gamma_is_only_s2aps_radius(finished):
    spec = finished
    base = read_result(spec, Cell.finetune(1, "hydra", 0.8, "base"))
    s2ap = read_result(spec, Cell.finetune(1, "hydra", 0.8, "s2ap"))
    assert (base["variant"], base["gamma"], base["finetune"]) == ("base", None, "plain")
    assert s2ap["variant"] == "s2ap" and s2ap["gamma"] in spec.gammas
    assert s2ap["search_cell"] == Cell.search(1, "hydra", 0.8, s2ap["gamma"]).key
    assert read_result(spec, Cell.search(1, "hydra", 0.8, 0.0))["gamma"] is None
    assert 0.79 < s2ap["global_sparsity"] < 0.81, "the evaluated network is pruned"


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
        ResultRow(seed=1, base_method="hydra", variant="base", sparsity=0.9, pgd_acc=0.5),
        ResultRow(seed=1, base_method="hydra", variant="s2ap", sparsity=0.9, gamma=0.01, pgd_acc=0.6),
        # a search that was not finetuned does not pair
        ResultRow(
            seed=1, base_method="hydra", variant="s2ap", sparsity=0.9, gamma=0.05, pgd_acc=0.9, selected=False
        ),
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


@pytest.mark.slow  # 30 s; CI's real SLURM cluster runs the same submitit launcher (test_slurm.py)
def test_submitit_local_launcher_respects_dependencies(finished, tmp_path):
    pytest.importorskip("submitit")
    spec = replace(finished, out=str(tmp_path), seeds=[1], gammas=[0.01], launcher="submitit_local")
    run_study(spec)
    pre = read_result(spec, Cell.pretrain(1))
    fin = read_result(spec, Cell.finetune(1, "hydra", 0.8, "s2ap"))
    assert fin["init_sha256"] == pre["weights_sha256"]
    assert (tmp_path / "submitit").is_dir() and (tmp_path / "study.md").is_file()


BAD_SPECS = [
    # (change, the message names the key and what is wrong)
    ({"gammas": [0.0]}, r"gammas=\[0.0\]: 0.0 is not valid; valid: S2AP radii > 0"),
    ({"launcher": "pbs"}, r"launcher='pbs' is unknown"),
    ({"base_methods": ["obd"]}, r"base_methods=\['obd'\]: 'obd' is not valid; valid: hydra, harp"),
    ({"attack_precision": "bf16"}, r"attack_precision='bf16' is unknown; valid: fp32, training"),
    # issue 20: out-of-range and repeated values, an AWP arm without AWP settings, an empty grid
    (
        {"sparsities": [0.9, 1.0]},
        r"sparsities=\[0.9, 1.0\]: 1.0 is not valid; valid: pruned fractions in \(0, 1\)",
    ),
    ({"sparsities": [0.0]}, r"sparsities=\[0.0\]: 0.0 is not valid"),
    ({"sparsities": [0.8, 0.9, 0.8]}, r"sparsities=\[0.8, 0.9, 0.8\]: 0.8 is repeated"),
    ({"gammas": [0.01, 0.05, 0.01]}, r"gammas=\[0.01, 0.05, 0.01\]: 0.01 is repeated"),
    ({"seeds": [1, 2, 1]}, r"seeds=\[1, 2, 1\]: 1 is repeated"),
    ({"base_methods": ["hydra", "hydra"]}, r"base_methods=\['hydra', 'hydra'\]: 'hydra' is repeated"),
    ({"awp": True, "awp_gamma": 0.0}, r"awp=true without AWP settings: awp_gamma=0.0 must be > 0"),
    ({"awp": True, "awp_gamma": None}, r"awp=true without AWP settings: awp_gamma=None"),
    ({"sparsities": []}, r"sparsities=\[\]: the grid is empty"),
    ({"gammas": []}, r"gammas=\[\]: the grid is empty"),
    ({"seeds": []}, r"seeds=\[\]: the grid is empty"),
    ({"base_methods": []}, r"base_methods=\[\]: the grid is empty"),
    ({"data": {"batchsize": 64}}, r"data: 'batchsize' is not a DataModule setting; valid: dataset, "),
    ({"model": "resnet7"}, r"model='resnet7' is unknown; valid: "),
    # issue 20: finetuning arms, extra seeds, workers, collapse margin, method options
    (
        {"finetune_arms": ["plain", "sam"]},
        r"finetune_arms=\['plain', 'sam'\]: 'sam' is not valid; valid: plain, awp",
    ),
    ({"finetune_arms": []}, r"finetune_arms=\[\]: the grid is empty"),
    ({"finetune_arms": ["awp", "awp"]}, r"finetune_arms=\['awp', 'awp'\]: 'awp' is repeated"),
    (
        {"finetune_arms": ["awp"], "awp_gamma": 0.0},
        r"finetune_arms=\['awp'\] has an awp arm without AWP settings",
    ),
    (
        {"finetune_arms": ["plain"], "awp": True},
        r"awp=true asks for AWP finetuning, but finetune_arms=\['plain'\]",
    ),
    (
        {"extra_seeds": {0.9: [5]}},
        r"extra_seeds: sparsity 0.9 is not in sparsities=\[0.8\]; valid: one of sparsities",
    ),
    ({"extra_seeds": {0.8: [2]}}, r"extra_seeds\[0.8\]=\[2\]: seed 2 is already in seeds=\[1, 2\]"),
    ({"extra_seeds": {0.8: [5, 5]}}, r"extra_seeds\[0.8\]=\[5, 5\]: 5 is repeated"),
    ({"extra_seeds": {0.8: 5}}, r"extra_seeds\[0.8\]=5 must be a list of seeds"),
    ({"extra_seeds": {"dense": [5]}}, r"extra_seeds: key 'dense' is not a sparsity"),
    ({"workers": 0}, r"workers=0 must be an integer >= 1"),
    ({"workers": 2, "launcher": "slurm"}, r"workers=2 runs cells in local processes, but launcher='slurm'"),
    ({"collapse_margin": 1.5}, r"collapse_margin=1.5 must lie in \[0, 1\)"),
    (
        {"method_options": {"harp": {"size_loss_weight": 5}}},
        r"method_options: 'harp' is not one of base_methods",
    ),
    (
        {"method_options": {"hydra": {"speed": 1}}},
        r"method_options\[hydra\]: method 'hydra' has no option speed",
    ),
]


@pytest.mark.parametrize("change, message", BAD_SPECS, ids=[next(iter(c)) for c, _ in BAD_SPECS])
def test_bad_spec_is_refused_before_anything_runs(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        tiny_spec(tmp_path, **change)
    assert not any(tmp_path.iterdir())


def test_bad_spec_from_the_command_line_fails_in_one_line_naming_the_key(tmp_path, capsys):
    config = str(ROOT / "tests" / "configs" / "study_tiny.yaml")
    out = tmp_path / "s"
    assert main(["study", "--config", config, "--out", str(out), "--sparsities", "[0.8, 0.8]"]) == 2
    assert "s2ap: error: sparsities=[0.8, 0.8]: 0.8 is repeated" in capsys.readouterr().err
    assert main(["study", "--config", config, "--out", str(out), "--awp", "true", "--awp_gamma", "0"]) == 2
    assert "awp=true without AWP settings" in capsys.readouterr().err
    assert main(["study", "--config", config, "--out", str(out), "--data_config", "nope.yaml"]) == 2
    assert "data_config='nope.yaml' does not exist" in capsys.readouterr().err
    assert not out.exists(), "nothing written"


def test_cells_name_their_variant_and_read_the_old_gamma_flag():
    assert Cell.finetune(1, "hydra", 0.9, "s2ap").key == "seed1/finetune/hydra_sp0.9_s2ap"
    assert Cell.search(1, "hydra", 0.9, 0.0).key == "seed1/search/hydra_sp0.9_g0"
    assert Cell.search(1, "hydra", 0.9, 0.01).variant == "s2ap"
    # A cell as an older version pickled it for a queued SLURM job: gamma 1.0 meant S2AP.
    old = {"kind": "finetune", "seed": 1, "base_method": "hydra", "sparsity": 0.9, "gamma": 1.0}
    assert Cell.from_dict(old) == Cell.finetune(1, "hydra", 0.9, "s2ap")
    assert Cell.from_dict({**old, "gamma": 0.0}) == Cell.finetune(1, "hydra", 0.9, "base")
    with pytest.raises(ValueError, match="variant='s2ap' with gamma=0.0"):
        Cell("search", 1, "hydra", 0.9, "s2ap", 0.0)
    with pytest.raises(ValueError, match="finetune cell: gamma=1.0"):
        Cell("finetune", 1, "hydra", 0.9, "s2ap", 1.0)


def test_data_config_model_block_with_or_without_init_args(tmp_path):
    """`model: {eps: ...}` and `model: {init_args: {eps: ...}}` both set the study's threat model."""
    for block in ("model: {eps: 0.2, step_size: 0.05}", "model: {init_args: {eps: 0.2, step_size: 0.05}}"):
        path = tmp_path / "data.yaml"
        path.write_text(f"data: {{dataset: synthetic}}\n{block}\n")
        data, model = StudySpec(name="x", data_config=str(path)).data_settings()
        assert data == {"dataset": "synthetic"} and model == {"threat": {"eps": 0.2, "step_size": 0.05}}, (
            block
        )
