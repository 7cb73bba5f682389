"""Every shipped config composes and validates through the real CLI parser."""

from pathlib import Path

import pytest

from s2ap_lightning.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = sorted((CONFIGS / "stages").glob("*.yaml"))
DATA = sorted((CONFIGS / "data").glob("*.yaml"))
TRAINERS = sorted((CONFIGS / "trainer").glob("*.yaml"))


def print_config(*configs, capsys):
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("stage", STAGES, ids=lambda p: p.stem)
@pytest.mark.parametrize("data", DATA, ids=lambda p: p.stem)
def test_stage_and_data_configs_compose(stage, data, capsys):
    out = print_config(stage, data, CONFIGS / "trainer" / "cpu.yaml", capsys=capsys)
    assert "class_path: s2ap_lightning.stages." in out
    assert f"dataset: {data.stem}" in out


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda p: p.stem)
def test_trainer_presets_parse(trainer, capsys):
    out = print_config(
        CONFIGS / "stages" / "s2ap.yaml", CONFIGS / "data" / "digits.yaml", trainer, capsys=capsys
    )
    if trainer.stem == "slurm":
        assert "SLURMEnvironment" in out and "auto_requeue: true" in out
    if trainer.stem in ("gpu", "gpu_large_batch", "ddp", "slurm"):
        assert "precision: bf16-mixed" in out
    if trainer.stem != "gpu_large_batch":
        assert "attack_precision: fp32" in out and "compile: false" in out
    assert "gradient_clip_val: null" in out, "manual optimisation: no clipping in shared presets"


@pytest.mark.parametrize("preset_first", [False, True], ids=["preset_last", "preset_first"])
def test_large_batch_preset_composes_with_stage_and_data_in_either_order(preset_first, capsys):
    preset = CONFIGS / "trainer" / "gpu_large_batch.yaml"
    others = [CONFIGS / "stages" / "s2ap.yaml", CONFIGS / "data" / "digits.yaml"]
    out = print_config(*([preset, *others] if preset_first else [*others, preset]), capsys=capsys)
    # The preset reaches the stage's own options ...
    assert "attack_precision: training" in out and "compile: true" in out
    # ... without replacing the stage class or the values the other configs set (digits' eps and
    # step size differ from the class defaults, so losing them would show).
    assert "class_path: s2ap_lightning.stages.ScoreSpaceSAMPruner" in out
    assert "eps: 0.1" in out and "step_size: 0.025" in out
    assert "precision: bf16-mixed" in out


@pytest.mark.parametrize("stage", ["finetune", "s2ap"])
def test_ap_benchmark_preset_sets_the_benchmarks_protocol(stage, capsys):
    args = ["test"]
    for c in (
        CONFIGS / "stages" / f"{stage}.yaml",
        CONFIGS / "data" / "cifar10.yaml",
        CONFIGS / "eval" / "ap_benchmark.yaml",
    ):
        args += ["--config", str(c)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    # AutoAttack standard at eps 0.031 (the benchmark's, not 8/255) on the whole CIFAR-10 test split.
    for line in ("eps: 0.031\n", "aa_version: standard", "aa_images: 10000", "test_subset: 0", "norm: linf"):
        assert line in out, line
    assert "dataset: cifar10" in out and "class_path: s2ap_lightning.stages." in out


def test_records_name_the_benchmark_protocol_only_when_it_ran():
    import torch

    from s2ap_lightning.evaluation import EvalProtocol, ThreatModel, autoattack_plan, summarise
    from s2ap_lightning.evaluation.protocol import AP_BENCHMARK

    def record(n, eps=0.031, aa_images=10_000, version="standard"):
        threat = ThreatModel(eps=eps, step_size=2 / 255)
        protocol = EvalProtocol(aa_images=aa_images, aa_version=version)
        flags = {k: torch.ones(n, dtype=torch.bool) for k in ("clean", "pgd", "pgd_fewer", "eps0", "aa")}
        flags["zero_grad"] = torch.zeros(n, dtype=torch.bool)
        flags["in_aa"] = torch.arange(n) < aa_images
        return summarise(flags, torch.arange(n) % 10, threat, protocol, autoattack_plan(10, version))

    assert record(10_000).protocol_name == AP_BENCHMARK
    assert record(10_000).as_dict()["protocol_name"].startswith("ap_benchmark:")
    assert record(10_000, eps=8 / 255).protocol_name is None  # our CIFAR eps, not the benchmark's
    assert record(10_000, aa_images=1000).protocol_name is None  # AutoAttack on a sample only
    assert record(2_000, aa_images=2_000).protocol_name is None  # a test subset
    assert record(10_000, version="plus").protocol_name is None
