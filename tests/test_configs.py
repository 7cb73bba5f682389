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
