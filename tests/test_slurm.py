"""On a real SLURM cluster: the shipped sbatch script requeued and resumed, and ``s2ap study`` on SLURM.

Marked ``slurm``. Skipped with a reason where no cluster answers (``.ci/slurm_up.sh`` brings up a
one-node one as root); where ``S2AP_REQUIRE_SLURM=1`` (CI), a missing cluster fails instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
S2AP = str(Path(sys.executable).with_name("s2ap"))
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


def _cluster_answers() -> str | None:
    """None when a cluster takes jobs here, else why not."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no SLURM client (sbatch, sinfo) on PATH"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    if not re.search(r"idle|mixed|allocated", states.stdout):
        return f"no SLURM node is up (sinfo: {states.stdout.strip() or states.stderr.strip()!r})"
    return None


@pytest.fixture(scope="module")
def cluster():
    why = _cluster_answers()
    if why is None:
        return
    if os.environ.get("S2AP_REQUIRE_SLURM") == "1":
        pytest.fail(f"S2AP_REQUIRE_SLURM=1 but {why}; .ci/slurm_up.sh should have started one")
    pytest.skip(f"{why}; `bash .ci/slurm_up.sh` (as root) starts a one-node cluster")


def _states(job_ids):
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i %T %r"], capture_output=True, text=True, check=True
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return {r[0]: (r[1], r[2] if len(r) > 2 else "") for r in rows if r[0] in set(job_ids)}


def _wait_gone(job_ids, timeout=600):
    """Wait until SLURM has finished these jobs, releasing requeued ones at once (Slurm waits ~120 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = _states(job_ids)
        if not states:
            return
        for job, (state, reason) in states.items():
            if state == "PENDING" and reason == "BeginTime":
                subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
        time.sleep(1)
    subprocess.run(["scancel", *job_ids])
    pytest.fail(f"jobs {job_ids} still queued after {timeout} s: {_states(job_ids)}")


def _job_info(job_id):
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


@pytest.fixture(scope="module")
def pretrained(cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    done = subprocess.run(
        [S2AP, "fit", "--config", "configs/stages/pretrain.yaml", "--config", "configs/data/synthetic.yaml",
         "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--seed_everything", "0",
         "--checkpoint.dirpath", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "best.ckpt"


def _submit(run, init, tasks, log_dir):
    """The shipped script, as written, with overrides for a CPU partition and tiny data."""
    env = {
        **os.environ,
        "RUN": str(run),
        "DATA": "configs/data/synthetic.yaml",
        "INIT": str(init),
        "S2AP": S2AP,
    }
    command = [
        "sbatch", "--parsable", f"--ntasks-per-node={tasks}", "--cpus-per-task=1", "--time=15",
        f"--output={log_dir}/%x-%j.out", "configs/slurm/s2ap_search.sbatch",
        "--trainer.precision", "32-true", "--trainer.max_epochs", "4", "--model.warmup_epochs", "1",
        "--model.sparsity", "0.8", "--seed_everything", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--data.synthetic_samples", str(2048 * tasks),
        "--data.batch_size", "16",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip().split(";")[0]


# Two tasks (DDP over srun) is the case that used to hang; one task runs with `pytest -m slow`.
@pytest.mark.parametrize("tasks", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_sbatch_script_requeued_by_sigusr1_resumes_to_the_uninterrupted_mask(tmp_path, pretrained, tasks):
    job = _submit(tmp_path / "requeued", pretrained, tasks, tmp_path)
    # The uninterrupted run beside it when both fit on the node's CPUs (one task each), else after it.
    reference = _submit(tmp_path / "uninterrupted", pretrained, tasks, tmp_path) if tasks == 1 else None
    log = tmp_path / f"s2ap-search-{job}.out"
    deadline = time.monotonic() + 300
    while "epoch 1/4" not in (log.read_text() if log.is_file() else ""):
        assert time.monotonic() < deadline, f"job {job} did not finish its first epoch: {_states([job])}"
        time.sleep(0.2)
    # Inside the second training epoch, as `#SBATCH --signal=SIGUSR1@90` would before the time limit.
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    _wait_gone([job])
    reference = reference or _submit(tmp_path / "uninterrupted", pretrained, tasks, tmp_path)
    _wait_gone([reference])

    info = _job_info(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert info["Restarts"] == "1", "requeued exactly once"
    text = log.read_text()
    assert f"job {job} restart 0" in text and f"job {job} restart 1" in text, "the log holds both attempts"
    assert "requeued SLURM job" in text and "Restored all states from the checkpoint" in text
    assert "already holds a run" not in text
    hpc = torch.load(tmp_path / "requeued" / "hpc_ckpt_1.ckpt", weights_only=True)
    assert hpc["epoch"] >= 1 and hpc["slurm_job_id"] == job
    final = torch.load(tmp_path / "requeued" / "last.ckpt", weights_only=True)
    expected = torch.load(tmp_path / "uninterrupted" / "last.ckpt", weights_only=True)
    assert final["global_step"] == expected["global_step"] > hpc["global_step"]
    for key, value in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key


def _partition():
    return subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True).stdout.split()[0]


def _study(out, *extra):
    slurm = f"{{slurm_partition: {_partition()}, timeout_min: 20, cpus_per_task: 1}}"
    command = [
        S2AP, "study", "--config", "tests/configs/study_tiny.yaml", "--out", str(out), "--seeds", "[1]",
        "--launcher", "slurm", "--slurm", slurm,
        *extra,
    ]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


# 73 s on CI: a second real-cluster study; the failed-cell study below keeps one in the default suite.
@pytest.mark.slow
def test_study_on_slurm_submits_nothing_twice_and_writes_the_report(tmp_path, cluster):
    first = _study(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    jobs = json.loads((tmp_path / "submitit" / "jobs.json").read_text())
    assert len(jobs) == 6 and first.stdout.count("submitted ") == 6
    again = _study(tmp_path)  # while the cells are queued or running
    assert again.returncode == 0, again.stderr[-2000:]
    assert "submitted " not in again.stdout, again.stdout
    assert json.loads((tmp_path / "submitit" / "jobs.json").read_text()) == jobs
    _wait_gone(list(jobs.values()))
    for job in jobs.values():
        assert _job_info(job)["JobState"] == "COMPLETED", _job_info(job)
    last = _study(tmp_path)
    assert last.returncode == 0, last.stderr[-2000:]
    assert "submitted " not in last.stdout and (tmp_path / "study.md").is_file()


def test_study_on_slurm_a_failed_cell_cancels_its_dependents_and_is_named(tmp_path, cluster):
    # A learning rate that makes pretraining fail at run time (non-finite loss), not at submission.
    first = _study(tmp_path, "--pretrain_lr", "1e30")
    assert first.returncode == 0, first.stderr[-2000:]
    jobs = json.loads((tmp_path / "submitit" / "jobs.json").read_text())
    _wait_gone(list(jobs.values()), timeout=300)  # dependents do not stay pending forever
    pretrain = jobs["seed1/pretrain"]
    assert _job_info(pretrain)["JobState"] == "FAILED"
    assert {_job_info(j)["JobState"] for k, j in jobs.items() if k != "seed1/pretrain"} == {"CANCELLED"}
    rerun = _study(tmp_path, "--pretrain_lr", "1e30")
    try:
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        log = tmp_path / "submitit" / f"{pretrain}_0_log.err"
        assert (
            f"cell seed1/pretrain: job {pretrain} ended without a result (FloatingPointError: "
            in rerun.stdout
        ), rerun.stdout
        assert f"log: {log}" in rerun.stdout and log.is_file()
    finally:
        resubmitted = json.loads((tmp_path / "submitit" / "jobs.json").read_text())
        subprocess.run(["scancel", *resubmitted.values()])


def test_study_on_slurm_refuses_a_partition_that_does_not_exist(tmp_path, cluster):
    done = subprocess.run(
        [S2AP, "study", "--config", "tests/configs/study_tiny.yaml", "--out", str(tmp_path), "--launcher",
         "slurm", "--slurm", "{slurm_partition: nosuch}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"slurm.slurm_partition='nosuch' does not exist; partitions: {_partition()}" in done.stderr
    assert not (tmp_path / "spec.yaml").exists(), "refused before anything is written"
