"""A run killed with SIGKILL mid-epoch resumes with `ckpt_path: last` to the same final mask."""

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("resume_worker.py")


def _run(out, *args, base_method="hydra"):
    env = {**os.environ, "RESUME_BASE_METHOD": base_method}
    return subprocess.run(
        [sys.executable, str(WORKER), str(out), *args], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.parametrize("base_method", ["hydra", "harp"])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, base_method):
    """HARP adds learnt rates and the size-loss schedule's state, which must survive the kill too."""
    run = functools.partial(_run, base_method=base_method)
    full = run(tmp_path / "full", "full")
    assert full.returncode == 0, full.stderr[-2000:]
    reference = torch.load(tmp_path / "full" / "full.pt", weights_only=True)
    steps_per_epoch = reference["global_step"] // 3
    kill_at = steps_per_epoch + steps_per_epoch // 2  # the middle of the second epoch (S2AP active)

    killed = run(tmp_path / "run", "kill", str(kill_at))
    assert killed.returncode == -signal.SIGKILL, "the worker really died by SIGKILL"
    last = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == kill_at, "the last checkpoint is the step before the kill"

    loader_state = last["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == [{"seed": 0, "epoch": 1, "num_replicas": 1}], loader_state

    resumed = run(tmp_path / "run", "resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "not resumable" not in resumed.stderr, "the training loader is stateful the way Lightning expects"
    result = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)
    assert result["global_step"] == reference["global_step"]
    for name, mask in reference["masks"].items():
        assert torch.equal(result["masks"][name], mask), name
        assert torch.equal(result["scores"][name], reference["scores"][name]), name
    assert result["state"].keys() == reference["state"].keys()
    for key, value in reference["state"].items():
        assert torch.equal(result["state"][key], value), key
    if base_method == "harp":
        assert any(k.startswith("scores.rates") for k in reference["state"])


def test_resuming_under_another_seed_is_refused():
    from s2ap_lightning.data.samplers import ResumableLoader, ResumableSampler

    loader = ResumableLoader(list(range(10)), batch_size=2, sampler=ResumableSampler(10, seed=3))
    assert loader.state_dict() == {"seed": 3, "epoch": 0, "num_replicas": 1}
    loader.load_state_dict({"seed": 3, "epoch": 2})
    assert loader.sampler.epoch == 2
    with pytest.raises(
        ValueError, match=r"resuming with seed 3, but .* used seed 5: pass --seed_everything 5"
    ):
        loader.load_state_dict({"seed": 5, "epoch": 2})
