"""``s2ap test`` as a Lightning callback: THE evaluation (:func:`evaluate`) on the test split.

One checkpoint, one figure. The callback runs the very function the demo, the study and notebooks
call, on the DataModule's test split, once, on global rank 0: the figures do not depend on the number
of processes, the batch size of the test loader or how AutoAttack was batched, and a record written
by ``s2ap test`` equals :func:`evaluate` on the same model, images, threat and protocol.

The LightningModule under test provides :class:`EvaluatedModule`; the DataModule a ``test_set``
(a map-style Dataset yielding ``(x, y)`` or ``(x, y, index)``).
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from s2ap_lightning.attacks.pgd import ThreatModel
from s2ap_lightning.evaluation.protocol import EvalProtocol, EvalRecord, evaluate, write_record
from s2ap_lightning.evaluation.record import git_commit, plain

#: Names of the figures in Lightning's table of test results (``trainer.test``'s return value).
LOGGED = {
    "clean_acc": "test/clean_acc",
    "pgd_acc": "test/robust_acc",
    "pgd_fewer_acc": "test/pgd10_acc",
    "eps0_acc": "test/eps0_acc",
    "aa_acc": "test/aa_acc",
}


@runtime_checkable
class EvaluatedModule(Protocol):
    """What :class:`EvaluationCallback` reads from the LightningModule under test.

    Attributes:
        threat: what to attack with at test time (norm, budget, step size).
        evaluation: how to evaluate (steps, restarts, AutoAttack sample, seed, check settings).
        trained_hparams: the checkpoint's hyper-parameters, as trained; the record keeps them, and
            the threat-model line says when the evaluated threat is not the one trained at (its
            ``threat`` block, see :func:`trained_threat`).

    """

    threat: ThreatModel
    evaluation: EvalProtocol
    trained_hparams: dict[str, Any]

    def evaluated_network(self) -> nn.Module:
        """The plain model with the evaluated weights substituted (e.g. ``w * M(s)``), logits out."""
        ...


CONTRACT = ("evaluated_network", "threat", "evaluation", "trained_hparams")


def threat_model_line(threat: ThreatModel, protocol: EvalProtocol, trained: dict[str, Any]) -> str:
    """What an evaluation attacks with, and what the model was trained at when that differs."""
    aa = (
        f"AutoAttack {protocol.aa_version} on {protocol.aa_images} images"
        if protocol.aa_images
        else "no AutoAttack"
    )
    line = (
        f"threat model: {threat.norm} eps {threat.eps:g}; PGD-{protocol.pgd_steps} (step "
        f"{threat.step_size:g}, {protocol.pgd_restarts} restart(s)); {aa}"
    )
    saved = trained_threat(trained)
    was = (saved.get("norm") or threat.norm, threat.eps if saved.get("eps") is None else saved["eps"])
    if was[0] != threat.norm or abs(float(was[1]) - threat.eps) > 1e-12:
        line += f". NOT the training threat model ({was[0]} eps {float(was[1]):g})"
    return line


def trained_threat(trained: dict[str, Any]) -> dict[str, Any]:
    """The threat model a checkpoint was trained at: its ``threat`` block, or older flat keys."""
    block = trained.get("threat")
    if isinstance(block, dict):
        return {k: block.get(k) for k in ("norm", "eps", "step_size", "steps")}
    return {"norm": trained.get("norm"), "eps": trained.get("eps"), "step_size": trained.get("step_size"),
            "steps": trained.get("attack_steps")}  # fmt: skip


def unused_record_path(first: Path) -> Path:
    """``first`` if it does not exist yet, else ``<stem>.2.json``, ``<stem>.3.json``, ... (the first free)."""
    path, n = first, 1
    while path.exists():
        n += 1
        path = first.with_name(f"{first.name.removesuffix('.json')}.{n}.json")
    return path


def first_record_path(trainer: L.Trainer) -> Path:
    """``<checkpoint>.eval.json`` beside an evaluated checkpoint, else ``eval.json`` in the log dir.

    Call it on every rank: ``trainer.log_dir`` is a collective call under DDP.
    """
    ckpt = getattr(trainer, "ckpt_path", None)
    if ckpt:
        return Path(ckpt).with_suffix(".eval.json")
    return Path(trainer.log_dir or trainer.default_root_dir) / "eval.json"


def evaluation_record(trainer: L.Trainer, module: EvaluatedModule, record: EvalRecord) -> dict[str, Any]:
    """The JSON record: figures, what they rest on, checks, and everything to reproduce them.

    ``threat_model`` and ``protocol`` are what was evaluated; ``hyper_parameters`` and
    ``trained_threat_model`` what the checkpoint was trained with.
    """
    data = getattr(trainer, "datamodule", None)
    ckpt = getattr(trainer, "ckpt_path", None)
    trained = dict(module.trained_hparams or {})
    hparams = getattr(data, "hparams", None)
    return {
        "checkpoint": str(ckpt) if ckpt else None,
        "stage": type(module).__name__,
        **record.as_dict(),
        "test_subset": getattr(data, "test_subset_info", None),
        "seed": os.environ.get("PL_GLOBAL_SEED"),
        "dataset": plain(dict(hparams)) if hparams is not None else None,
        "hyper_parameters": plain(trained),
        "trained_threat_model": trained_threat(trained),
        "precision": str(trainer.precision),
        "world_size": trainer.world_size,
        "git_commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class EvaluationCallback(Callback):
    """Run :func:`evaluate` on the test split at the end of ``trainer.test``; log, warn and record.

    On global rank 0 only; the other ranks wait for it, then every rank leaves together. The wait
    uses a gloo process group of its own with ``wait_timeout`` (default seven days): an AutoAttack
    evaluation of a full test split takes hours, longer than the default timeout of a DDP process
    group (30 minutes), after which the waiting ranks would abort.

    Logged (rank 0, at the end of the test epoch): ``test/clean_acc``, ``test/robust_acc`` (the final
    PGD), ``test/pgd10_acc`` (the weaker PGD), ``test/eps0_acc``, ``test/aa_acc`` (with AutoAttack),
    ``test/eps`` and ``test/pgd_steps``. Each failed check of a model that is not collapsed warns
    ``EVALUATION CHECK FAILED (...)``; a collapsed model warns once that it is collapsed. The record
    is written beside the checkpoint (``<checkpoint>.eval.json``; a second evaluation of the same
    checkpoint ``.eval.2.json``, and so on: a record is never replaced).

    Args:
        wait_timeout: how long the other ranks wait for rank 0's evaluation.

    """

    def __init__(self, wait_timeout: datetime.timedelta = datetime.timedelta(days=7)) -> None:
        self.wait_timeout = wait_timeout
        self.record: EvalRecord | None = None
        self.record_path: Path | None = None
        self._group: Any = None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        missing = [name for name in CONTRACT if not hasattr(pl_module, name)]
        if missing:
            raise TypeError(
                f"EvaluationCallback needs the LightningModule to provide {', '.join(CONTRACT)} "
                f"(see EvaluatedModule); {type(pl_module).__name__} lacks {', '.join(missing)}"
            )
        data = getattr(trainer, "datamodule", None)
        if data is None or getattr(data, "test_set", None) is None:
            raise ValueError(
                "EvaluationCallback needs a DataModule with a test_set (a Dataset of (x, y[, index])): "
                "its test split names the evaluated images"
            )
        self.record, self.record_path, self._group = None, None, None
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank creates it (a collective call); rank 0 is the only one that then works.
            self._group = torch.distributed.new_group(backend="gloo", timeout=self.wait_timeout)
        trained = dict(pl_module.trained_hparams or {})
        pl_module.print(threat_model_line(pl_module.threat, pl_module.evaluation, trained))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        first = first_record_path(trainer)  # on every rank: trainer.log_dir is collective under DDP
        if trainer.is_global_zero:
            self._evaluate(trainer, pl_module, first)
        self._wait(trainer)

    def _evaluate(self, trainer: L.Trainer, module: Any, first: Path) -> None:
        threat, protocol = module.threat, module.evaluation
        record = evaluate(module.evaluated_network(), trainer.datamodule.test_set, threat, protocol)
        if record.autoattack_skipped:
            module.print(record.autoattack)
        for key, name in LOGGED.items():
            if getattr(record, key) is not None:
                module.log(name, getattr(record, key), rank_zero_only=True)
        # In Lightning's table of test figures, beside them: the budget they were measured at.
        module.log("test/eps", float(threat.eps), rank_zero_only=True)
        module.log("test/pgd_steps", float(protocol.pgd_steps), rank_zero_only=True)
        for failure in record.failures():
            rank_zero_warn(
                f"EVALUATION CHECK FAILED ({failure}). The robust accuracy may be overestimated "
                "(gradient masking or a broken evaluation)."
            )
        if record.collapsed:
            failed = record.collapsed_failures()
            rank_zero_warn(
                f"MODEL COLLAPSED: clean accuracy {record.clean_acc:.4f} is at most the majority-class "
                f"rate {record.majority_class_rate:.4f} + {protocol.collapse_margin:g}; it answers like a "
                f"constant, so its {len(failed)} failed check(s) are not evidence of gradient masking"
                + (f" ({'; '.join(failed)})" if failed else "")
            )
        path = write_record(unused_record_path(first), evaluation_record(trainer, module, record))
        module.print(f"evaluation written to {path}")
        self.record, self.record_path = record, path

    def _wait(self, trainer: L.Trainer) -> None:
        """Every rank waits for rank 0's record; no rank leaves (and tears its group down) before."""
        if self._group is not None:
            torch.distributed.barrier(group=self._group)
            torch.distributed.destroy_process_group(self._group)
            self._group = None
        else:
            trainer.strategy.barrier("s2ap evaluation record")
