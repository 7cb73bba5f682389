"""Shared fixtures: tiny data, fast stage settings, a quiet Trainer."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings

import lightning as L
import pytest
import torch

from s2ap_lightning.attacks import ThreatModel
from s2ap_lightning.evaluation import EvalProtocol

os.environ.setdefault("PYTHONHASHSEED", "0")
# Image-folder scans are kept between runs (data/datasets.py); the tests keep theirs out of the user's.
os.environ["S2AP_CACHE_DIR"] = tempfile.mkdtemp(prefix="s2ap-test-cache-")
atexit.register(shutil.rmtree, os.environ["S2AP_CACHE_DIR"], ignore_errors=True)
torch.set_num_threads(2)
warnings.filterwarnings("ignore", ".*does not have many workers.*")

#: Stage settings that run in well under a second per epoch on synthetic data.
FAST = dict(
    model="small_cnn",
    num_classes=4,
    in_channels=3,
    threat=ThreatModel(eps=0.1, step_size=0.03, steps=2),
    evaluation=EvalProtocol(pgd_steps=3),
)


@pytest.fixture
def fast_kwargs() -> dict:
    return dict(FAST)


@pytest.fixture
def synthetic_dm():
    from s2ap_lightning.data import RobustDataModule

    return RobustDataModule("synthetic", batch_size=32, synthetic_samples=256)


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture
def trainer_factory():
    return quiet_trainer
