"""The shipped cluster files as written, and the requeue rule of `s2ap fit` (no cluster needed)."""

import subprocess
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from s2ap_lightning.cli import main, run_cli
from s2ap_lightning.stages.callbacks import SlurmRequeue, StepCheckpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "configs" / "slurm" / "s2ap_search.sbatch"
FAST = ROOT / "tests" / "configs" / "cli_fast.yaml"


def _fit_args(folder, *extra):
    return [
        "fit", "--config", str(ROOT / "configs/stages/pretrain.yaml"), "--config", str(FAST),
        "--checkpoint.dirpath", str(folder), *extra,
    ]  # fmt: skip


@pytest.fixture
def slurm_job(monkeypatch):
    """The variables srun sets for a one-task batch job; returns a setter for the job id."""
    for key, value in dict(
        SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NAME="s2ap-test", SLURM_PROCID="0",
        SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost", SLURM_JOB_NUM_NODES="1",
    ).items():  # fmt: skip
        monkeypatch.setenv(key, value)
    return lambda job: monkeypatch.setenv("SLURM_JOB_ID", job)


def test_sbatch_script_needs_nothing_a_fresh_clone_lacks():
    text = SCRIPT.read_text()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --open-mode=append" in directives, "a requeue appends to the log"
    assert "#SBATCH --requeue" in directives and "#SBATCH --signal=SIGUSR1@90" in directives
    output = next(d for d in directives if d.startswith("#SBATCH --output="))
    assert "/" not in output.split("=", 1)[1], "the log goes to the submission folder, which exists"
    assert not any("gpu" in d or "gres" in d for d in directives), "GPUs come from sbatch options"
    assert 'mkdir -p "$RUN"' in text and '"$@"' in text
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_slurm_preset_keeps_last_every_epoch_and_every_500_steps(tmp_path, slurm_job):
    slurm_job("5")  # the preset names Lightning's SLURMEnvironment, which reads srun's variables
    cli = run_cli(
        [
            "--config", str(ROOT / "configs/stages/pretrain.yaml"), "--config",
            str(ROOT / "configs/trainer/slurm.yaml"), "--config", str(FAST), "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.precision", "32-true", "--checkpoint.dirpath", str(tmp_path),
        ],
        run=False,
    )  # fmt: skip
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    last = [c for c in checkpoints if c.filename == "last"]
    assert {type(c) for c in last} == {ModelCheckpoint, StepCheckpoint}
    epoch = next(c for c in last if type(c) is ModelCheckpoint)
    step = next(c for c in last if isinstance(c, StepCheckpoint))
    assert (epoch._every_n_epochs, epoch._every_n_train_steps) == (1, 0)
    assert (step._every_n_epochs, step._every_n_train_steps) == (0, 500)
    assert all(Path(c.dirpath) == tmp_path for c in checkpoints)


def test_step_and_epoch_checkpoints_both_write_last(tmp_path, trainer_factory):
    """Three steps an epoch, a step checkpoint every 2: last.ckpt also ends each epoch (step 3, 6)."""
    seen = []

    class Spy(StepCheckpoint):
        def _save_checkpoint(self, trainer, filepath):
            seen.append(trainer.global_step)
            super()._save_checkpoint(trainer, filepath)

    from s2ap_lightning.attacks import ThreatModel
    from s2ap_lightning.data import RobustDataModule
    from s2ap_lightning.stages import RobustPretrainer

    trainer = trainer_factory(
        max_epochs=2, limit_train_batches=3, limit_val_batches=1, enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="last", enable_version_counter=False),
                   Spy(dirpath=str(tmp_path), every_n_train_steps=2)],
    )  # fmt: skip
    threat = ThreatModel(eps=0.1, step_size=2 / 255, steps=1)
    model = RobustPretrainer(model="small_cnn", num_classes=4, in_channels=3, threat=threat)
    trainer.fit(model, datamodule=RobustDataModule("synthetic", batch_size=16))
    assert seen == [2, 4, 6]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 6
    with pytest.raises(ValueError, match="every_n_train_steps=-1 must be >= 0"):
        StepCheckpoint(every_n_train_steps=-1)


def _requeued_folder(tmp_path, job_id):
    """A run folder as a job leaves it when SlurmRequeue has saved and requeued it."""
    assert main(_fit_args(tmp_path, "--trainer.max_epochs", "1")) == 0
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    if job_id is not None:
        ckpt["slurm_job_id"] = job_id
    torch.save(ckpt, tmp_path / "hpc_ckpt_1.ckpt")
    return ckpt["global_step"]


def test_the_requeued_job_resumes_from_its_hpc_checkpoint(tmp_path, slurm_job, capsys):
    step = _requeued_folder(tmp_path, "77")
    capsys.readouterr()
    slurm_job("77")
    assert main(_fit_args(tmp_path, "--trainer.max_epochs", "2")) == 0
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "epoch 1/2" not in out, "resumed after epoch 1 from hpc_ckpt_1.ckpt"
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2 * step


def test_another_job_into_a_requeued_run_folder_is_refused(tmp_path, slurm_job, capsys):
    _requeued_folder(tmp_path, "77")
    before = (tmp_path / "hpc_ckpt_1.ckpt").read_bytes()
    slurm_job("78")
    assert main(_fit_args(tmp_path, "--trainer.max_epochs", "2")) == 2
    assert "already holds a run (best.ckpt, hpc_ckpt_1.ckpt, last.ckpt)" in capsys.readouterr().err
    assert (tmp_path / "hpc_ckpt_1.ckpt").read_bytes() == before


def test_hpc_checkpoint_without_a_job_id_counts_only_for_a_restarted_job(tmp_path, slurm_job, monkeypatch):
    """Lightning's own handler records no job id: SLURM_RESTART_COUNT says whether this job restarted."""
    _requeued_folder(tmp_path, None)
    slurm_job("90")
    assert main(_fit_args(tmp_path, "--trainer.max_epochs", "2")) == 2
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert main(_fit_args(tmp_path, "--trainer.max_epochs", "2")) == 0


def test_requeue_callback_is_idle_outside_slurm(trainer_factory):
    callback = SlurmRequeue()
    trainer = trainer_factory()
    callback.on_fit_start(trainer, None)
    assert not callback._active and callback._signum is None


def _study_args(out, *extra):
    return ["study", "--config", str(ROOT / "tests/configs/study_tiny.yaml"), "--out", str(out), *extra]


def test_study_on_slurm_without_sbatch_fails_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(_study_args(tmp_path / "s", "--launcher", "slurm")) == 2
    err = capsys.readouterr().err
    assert "launcher=slurm, but no `sbatch` is on PATH" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists(), "nothing written"


def test_study_asking_gpus_that_slurm_does_not_grant_fails_in_one_line(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "sinfo"):
        (bin_dir / tool).write_text("#!/bin/sh\necho gpu\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    args = _study_args(tmp_path / "s", "--launcher", "slurm", "--accelerator", "gpu")
    assert main([*args, "--slurm", "{slurm_partition: gpu}"]) == 2
    assert "accelerator='gpu' needs one GPU per cell, but slurm: grants none" in capsys.readouterr().err
    assert main([*args, "--slurm", "{slurm_partition: cpu}"]) == 2
    assert "slurm.slurm_partition='cpu' does not exist; partitions: gpu" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
