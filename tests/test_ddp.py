"""Data parallelism on CPU: 2 processes with gloo through ddp_spawn (pytest is not re-executed)."""

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from s2ap_lightning.attacks import ThreatModel
from s2ap_lightning.data import RobustDataModule
from s2ap_lightning.evaluation import EvalProtocol
from s2ap_lightning.stages import ScoreSpaceSAMPruner

pytestmark = pytest.mark.timeout(240)


class RecordingPruner(ScoreSpaceSAMPruner):
    """Saves each rank's score gradients after every backward pass, and its final masks."""

    def __init__(self, out_dir: str = "", **kwargs):
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self._grads = []

    def manual_backward(self, loss, *args, **kwargs):
        super().manual_backward(loss, *args, **kwargs)
        self._grads.append({n: s.grad.detach().clone() for n, s in self.method.items()})

    def on_train_end(self):
        rank = self.global_rank
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
        masks = {n: m.bool() for n, m in self.method.masks().items()}
        torch.save(
            {"grads": self._grads, "masks": masks, "metrics": metrics}, Path(self.out_dir) / f"rank{rank}.pt"
        )


@pytest.fixture(autouse=True)
def clean_distributed_env():
    keys = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "RANK")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_ddp(tmp_path, ascent_sync):
    L.seed_everything(0, verbose=False)
    pruner = RecordingPruner(
        out_dir=str(tmp_path),
        model="small_cnn",
        num_classes=4,
        in_channels=3,
        threat=ThreatModel(eps=0.1, step_size=0.03, steps=2),
        evaluation=EvalProtocol(pgd_steps=2),
        sparsity=0.8,
        gamma=0.1,
        warmup_epochs=0,
        ascent_sync=ascent_sync,
    )
    dm = RobustDataModule("synthetic", batch_size=16, synthetic_samples=160)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        limit_train_batches=3,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
    )
    trainer.fit(pruner, datamodule=dm)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def same(a, b):
    return all(torch.allclose(a[n], b[n], atol=1e-7) for n in a)


@pytest.mark.parametrize("ascent_sync", [False, True])
def test_ddp_gradients_masks_and_metrics(tmp_path, ascent_sync):
    r0, r1 = run_ddp(tmp_path, ascent_sync)
    assert len(r0["grads"]) == len(r1["grads"]) == 6, "two backward passes per step, three steps"
    first = [(a, b) for i, (a, b) in enumerate(zip(r0["grads"], r1["grads"])) if i % 2 == 0]
    second = [(a, b) for i, (a, b) in enumerate(zip(r0["grads"], r1["grads"])) if i % 2 == 1]
    # Pass 2 is always synchronised.
    assert all(same(a, b) for a, b in second)
    if ascent_sync:
        assert all(same(a, b) for a, b in first), "ascent_sync: pass-1 gradients are all-reduced"
    else:
        assert not any(same(a, b) for a, b in first), "default: pass-1 gradients stay rank-local"
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), "masks identical on every rank"
    for key in ("val/clean_acc", "val/robust_acc"):
        assert r0["metrics"][key] == r1["metrics"][key], f"{key} reduced across ranks"


def test_ddp_test_counts_every_image_once(tmp_path):
    """33 test images on 2 ranks: the sampler pads one image; the record still counts 33, once each."""
    import json

    from s2ap_lightning.stages import RobustPretrainer

    records = {}
    for devices in (1, 2):
        L.seed_everything(0, verbose=False)
        model = RobustPretrainer(
            model="small_cnn",
            num_classes=4,
            in_channels=3,
            threat=ThreatModel(eps=0.1, step_size=0.03),
            evaluation=EvalProtocol(pgd_steps=2, aa_images=0),
        )
        dm = RobustDataModule("synthetic", batch_size=8, synthetic_samples=165)
        root = tmp_path / f"d{devices}"
        trainer = L.Trainer(
            accelerator="cpu",
            devices=devices,
            strategy="ddp_spawn" if devices > 1 else "auto",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(root),
        )
        trainer.test(model, datamodule=dm)
        records[devices] = json.loads((root / "eval.json").read_text())
    single, ddp = records[1], records[2]
    assert single["n_images"] == ddp["n_images"] == 33
    assert ddp["class_counts"] == single["class_counts"]
    assert ddp["clean_acc"] == single["clean_acc"] and ddp["eps0_acc"] == ddp["clean_acc"]


# --------------------------------------------------------------------------- as users run it
ROOT = Path(__file__).resolve().parents[1]


def _s2ap(*args, timeout=240):
    """``s2ap`` with two processes in its own process group; a hang fails in ``timeout`` s."""
    import signal
    import subprocess
    import sys

    command = [sys.executable, "-m", "s2ap_lightning.cli", *args]
    proc = subprocess.Popen(
        command, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"`s2ap {' '.join(args[:2])}` hung for {timeout} s under DDP:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return out + err


def _stage(config, folder, *extra):
    # The defaults a user gets: the CSV logger, best/last checkpoints, the mask tracker, the summary.
    return _s2ap(
        "fit", "--config", f"configs/stages/{config}", "--config", "configs/data/synthetic.yaml",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--seed_everything", "0",
        "--data.synthetic_samples", "256", "--checkpoint.dirpath", str(folder), *extra,
    )  # fmt: skip


def test_every_stage_and_test_under_ddp_with_the_default_logger_and_callbacks(tmp_path):
    """Two processes (gloo) through the real CLI; the mask tracker's save used to hang rank 0."""
    _stage("pretrain.yaml", tmp_path / "pre")
    out = _stage(
        "s2ap.yaml", tmp_path / "s2ap", "--model.init_from", str(tmp_path / "pre" / "best.ckpt"),
        "--model.warmup_epochs", "1", "--model.sparsity", "0.8",
    )  # fmt: skip
    assert "ScoreSpaceSAMPruner epoch 2/2" in out, "the epoch summary printed (once, by rank 0)"
    assert out.count("ScoreSpaceSAMPruner epoch 2/2") == 1
    logs = sorted((tmp_path / "s2ap" / "lightning_logs").glob("version_*"))
    assert len(logs) == 1 and (logs[0] / "metrics.csv").is_file()
    masks = sorted(p.name for p in (logs[0] / "masks").iterdir())
    assert masks == ["epoch_000.pt", "epoch_001.pt", "init.pt"]
    assert "mask/hamming" in (logs[0] / "metrics.csv").read_text()
    _stage("finetune.yaml", tmp_path / "ft", "--model.init_from", str(tmp_path / "s2ap" / "best.ckpt"))
    ckpt = tmp_path / "ft" / "best.ckpt"
    out = _s2ap(
        "test", "--config", "configs/stages/finetune.yaml", "--config", "configs/data/synthetic.yaml",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--data.synthetic_samples", "256", "--ckpt_path", str(ckpt), "--model.evaluation.aa_images", "0",
        "--checkpoint.dirpath", str(tmp_path / "test"),
    )  # fmt: skip
    record = json.loads(ckpt.with_suffix(".eval.json").read_text())
    data = RobustDataModule("synthetic", synthetic_samples=256)
    data.setup()
    assert record["world_size"] == 2 and record["n_images"] == len(data.test_set), "every test image once"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() > 1]
    kept = sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(kept - 0.2) < 0.01, "the finetuned model keeps the searched 20 %"


class DivergingPruner(ScoreSpaceSAMPruner):
    """Rank 1 zeroes its largest score after each batch: its mask no longer matches rank 0's."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_rank == 1:
            with torch.no_grad():
                name, score = next(iter(self.method.items()))
                flat = score.view(-1)
                kept = flat.abs().argmax()
                flat[kept] = 0.0


def test_masks_that_differ_between_ranks_stop_the_run(tmp_path):
    from s2ap_lightning.stages.callbacks import MaskStabilityCallback

    pruner = DivergingPruner(
        model="small_cnn", num_classes=4, in_channels=3, threat=ThreatModel(eps=0.1, step_size=0.03, steps=1),
        evaluation=EvalProtocol(pgd_steps=1), sparsity=0.8, warmup_epochs=0,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", limit_train_batches=2, limit_val_batches=1,
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[MaskStabilityCallback(dirpath=str(tmp_path), save_masks=False)],
    )  # fmt: skip
    with pytest.raises(Exception, match="the masks differ between ranks at epoch 0"):
        trainer.fit(pruner, datamodule=RobustDataModule("synthetic", batch_size=16, synthetic_samples=160))
