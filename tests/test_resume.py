"""A run interrupted mid-epoch resumes to the same final mask as an uninterrupted one.

Two interruptions: SIGKILL (a node failure; resumed with ``ckpt_path: last``) and SIGUSR1 through the
SLURM path (the stages' SlurmRequeue callback saves an hpc checkpoint at a batch boundary and
requeues; the restarted job resumes from it with no ``ckpt_path``, as Lightning does under SLURM).
Each with one process and under the ``ddp`` strategy with 1 and 2 processes (CPU, gloo), and with
the interruption in the first, a middle and the last batch of an epoch.
"""

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("resume_worker.py")
pytestmark = pytest.mark.timeout(600)

FAKE_SCONTROL = """#!/bin/sh
# Stands in for SLURM: records the requeue, then stops the job (SIGTERM to the job's process group).
echo "$@" >> "$FAKE_SCONTROL_LOG"
(sleep 0.5; kill -TERM 0) >/dev/null 2>&1 &
"""


def _run(out, *args, base_method="hydra", strategy="auto", devices=1, slurm=None, scontrol=FAKE_SCONTROL):
    """Run the worker like a user's job: its own process group, all ranks, bounded in time.

    ``slurm``: a folder for the fake ``scontrol``; the tasks then get SLURM variables as srun sets them.
    """
    env = {
        **os.environ,
        "RESUME_BASE_METHOD": base_method,
        "RESUME_STRATEGY": strategy,
        "RESUME_DEVICES": str(devices),
    }
    command = launch = [sys.executable, str(WORKER), str(out), *args]
    if slurm is not None:
        # A fake srun: one process per task in one process group, each with its SLURM_PROCID.
        slurm.mkdir(exist_ok=True)
        (slurm / "scontrol").write_text(scontrol)
        (slurm / "scontrol").chmod(0o755)
        env.update(
            RESUME_SLURM="1",
            PATH=f"{slurm}:{env['PATH']}",
            FAKE_SCONTROL_LOG=str(slurm / "requeues.log"),
            SLURM_JOB_ID="4242",
            SLURM_JOB_NAME="resume-test",
            SLURM_NTASKS=str(devices),
            SLURM_NTASKS_PER_NODE=str(devices),
            SLURM_JOB_NUM_NODES="1",
            SLURM_NODELIST="localhost",
            SLURM_NODEID="0",
            MASTER_PORT=str(29500 + os.getpid() % 1000),
        )
        tasks = " & ".join(
            f"SLURM_PROCID={r} SLURM_LOCALID={r} {' '.join(map(str, command))}" for r in range(devices)
        )
        launch = ["sh", "-c", f"{tasks} & wait"]
    proc = subprocess.Popen(
        launch, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # a hang fails here, not at CI's limit
        stdout, stderr = proc.communicate()
        pytest.fail(f"worker {args} hung for 240 s; stderr:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@functools.cache
def _reference(base_method, strategy, devices, root):
    out = Path(root) / f"full_{base_method}_{strategy}_{devices}"
    full = _run(out, "full", base_method=base_method, strategy=strategy, devices=devices)
    assert full.returncode == 0, full.stderr[-3000:]
    return torch.load(out / "full.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    return lambda *key: _reference(*key, str(root))


def _assert_same_search(result, reference):
    assert result["global_step"] == reference["global_step"]
    for name, mask in reference["masks"].items():
        assert torch.equal(result["masks"][name], mask), name
        assert torch.equal(result["scores"][name], reference["scores"][name]), name
    assert result["state"].keys() == reference["state"].keys()
    for key, value in reference["state"].items():
        assert torch.equal(result["state"][key], value), key


def _position(steps_per_epoch, where):
    """A global step in the second epoch (S2AP active): its first, middle or last batch."""
    return steps_per_epoch + {"first": 0, "middle": steps_per_epoch // 2, "last": steps_per_epoch - 1}[where]


SLOW = pytest.mark.slow  # same mechanism as a default case; run with `pytest -m slow`
CASES = [
    # (base_method, strategy, devices, where)
    # One process, mid-epoch: HARP, whose learnt rates and size-loss schedule must survive the kill
    # too; HYDRA's one-process case is slow (31 s), its two-rank case below is in the default suite.
    pytest.param("hydra", "auto", 1, "middle", marks=SLOW),
    ("harp", "auto", 1, "middle"),
    pytest.param("hydra", "ddp", 1, "last", marks=SLOW),
    pytest.param("hydra", "ddp", 2, "first", marks=SLOW),  # epoch-boundary state: `last` covers two ranks
    pytest.param("hydra", "ddp", 2, "middle", marks=SLOW),
    ("hydra", "ddp", 2, "last"),
]


@pytest.mark.parametrize(("base_method", "strategy", "devices", "where"), CASES)
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(
    tmp_path, reference, base_method, strategy, devices, where
):
    ref = reference(base_method, strategy, devices)
    steps_per_epoch = ref["global_step"] // 3
    kill_at = _position(steps_per_epoch, where)
    run = functools.partial(_run, base_method=base_method, strategy=strategy, devices=devices)

    killed = run(tmp_path, "kill", str(kill_at))
    assert killed.returncode == -signal.SIGKILL, f"the worker really died by SIGKILL: {killed.stderr[-2000:]}"
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == kill_at, "the last checkpoint is the step before the kill"
    loader_state = last["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == [{"seed": 0, "epoch": 1 if where != "first" else 0, "num_replicas": devices}]

    resumed = run(tmp_path, "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr, "the training loader is stateful the way Lightning expects"
    _assert_same_search(torch.load(tmp_path / "resume.pt", weights_only=True), ref)
    if base_method == "harp":
        assert any(k.startswith("method.rates.") for k in ref["state"])
        assert "method.size_weight" in ref["state"] and "method.size_weight_frozen" in ref["state"]


@pytest.mark.parametrize(
    ("devices", "where"),
    [pytest.param(1, "middle", marks=SLOW), pytest.param(2, "middle", marks=SLOW), (2, "last")],
)
def test_slurm_requeue_signal_then_resume_equals_uninterrupted(tmp_path, reference, devices, where):
    """SIGUSR1 reaches rank 0 only; every rank saves the hpc checkpoint at the end of that batch."""
    ref = reference("hydra", "ddp", devices)
    signal_at = _position(ref["global_step"] // 3, where)
    slurm = tmp_path / "slurm"

    first = _run(tmp_path, "usr1", str(signal_at), strategy="ddp", devices=devices, slurm=slurm)
    assert (slurm / "requeues.log").read_text().split() == ["requeue", "4242"], first.stderr[-3000:]
    hpc = torch.load(tmp_path / "ckpt" / "hpc_ckpt_1.ckpt", weights_only=True)
    assert hpc["global_step"] == signal_at + 1, "saved after the signalled batch, at its end"
    assert hpc["slurm_job_id"] == "4242"
    assert not (tmp_path / "usr1.pt").exists(), "the requeued job stopped instead of training on"

    resumed = _run(tmp_path, "resume", strategy="ddp", devices=devices, slurm=slurm)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
    _assert_same_search(torch.load(tmp_path / "resume.pt", weights_only=True), ref)


def test_a_refused_requeue_keeps_the_checkpoint_and_trains_on(tmp_path):
    """`scontrol requeue` failing (a job without --requeue, say) must not stop or lose the run."""
    refusing = "#!/bin/sh\necho 'Requeue of job not allowed' >&2\nexit 1\n"
    done = _run(tmp_path, "usr1", "5", strategy="ddp", slurm=tmp_path / "slurm", scontrol=refusing)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Requeue of job not allowed" in done.stderr and "training goes on" in done.stderr
    assert (tmp_path / "ckpt" / "hpc_ckpt_1.ckpt").is_file() and (tmp_path / "usr1.pt").is_file()


def test_resuming_under_another_seed_is_refused():
    from s2ap_lightning.data.samplers import ResumableLoader, ResumableSampler

    loader = ResumableLoader(list(range(10)), batch_size=2, sampler=ResumableSampler(10, seed=3))
    assert loader.state_dict() == {"seed": 3, "epoch": 0, "num_replicas": 1}
    loader.load_state_dict({"seed": 3, "epoch": 2, "num_replicas": 1})
    assert loader.sampler.epoch == 2
    with pytest.raises(
        ValueError, match=r"resuming with seed 3, but .* used seed 5: pass --seed_everything 5"
    ):
        loader.load_state_dict({"seed": 5, "epoch": 2})


def test_sampler_shards_like_distributed_sampler_and_skips_per_rank():
    """Each rank's share is DistributedSampler's; a skip drops this rank's first batches only."""
    from torch.utils.data import DistributedSampler

    from s2ap_lightning.data.samplers import ResumableSampler

    for rank in (0, 1):
        ours = ResumableSampler(11, seed=4, num_replicas=2, rank=rank)
        torchs = DistributedSampler(range(11), num_replicas=2, rank=rank, seed=4)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            torchs.set_epoch(epoch)
            assert list(ours) == list(torchs)
            assert len(ours) == 6
        ours.skip_next(4)
        assert list(ours) == list(torchs)[4:]
        assert list(ours) == list(torchs), "the skip applies to one epoch only"


def test_mid_epoch_resume_on_another_world_size_is_refused():
    from s2ap_lightning.data.samplers import ResumableLoader, ResumableSampler

    loader = ResumableLoader(list(range(10)), batch_size=2, sampler=ResumableSampler(10, seed=0))
    loader.load_state_dict({"seed": 0, "epoch": 1, "num_replicas": 2})
    with pytest.raises(ValueError, match=r"on 1 process\(es\), but the checkpoint's epoch was split over 2"):
        loader.sampler.skip_next(4)
