"""Every file the project writes for a user goes through one atomic writer (``checkpoint.atomic_file``).

A write that fails half-way (here: the disk refusing the final flush) keeps the previous file whole
and leaves no temporary file behind. That is how an evaluation record, a study's spec, its job ledger
or a results table survives a job killed while it writes.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from s2ap_lightning import checkpoint
from s2ap_lightning.analysis.report import ResultRow, write_report, write_results_csv
from s2ap_lightning.evaluation import write_record
from s2ap_lightning.jobs.cells import Cell, StudySpec, save_spec
from s2ap_lightning.jobs.study import SubmittedJobs

ROW = ResultRow(variant="dense", sparsity=0.0, stage="pretrain", seed=1, clean_acc=0.9, pgd_acc=0.5)

# (file name, how the project writes it)
WRITERS = {
    "record": ("model.eval.json", lambda d: write_record(d / "model.eval.json", {"clean_acc": 0.5})),
    "results_csv": ("results.csv", lambda d: write_results_csv([ROW], d / "results.csv")),
    "report": ("report.md", lambda d: write_report(d, [ROW], title="t")),
    "spec": ("spec.yaml", lambda d: save_spec(StudySpec(name="s", out=str(d)))),
    "jobs": ("jobs.json", lambda d: SubmittedJobs(d).record(Cell.pretrain(1), "42")),
    "checkpoint": (
        "last.ckpt",
        lambda d: checkpoint.atomic_torch_save({"w": torch.ones(2)}, d / "last.ckpt"),
    ),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch, writer):
    name, write = WRITERS[writer]
    write(tmp_path)
    before = (tmp_path / name).read_bytes()
    files_before = sorted(p.name for p in tmp_path.iterdir())

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write(tmp_path)
    assert (tmp_path / name).read_bytes() == before, "the previous file is whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == files_before, "no temporary file is left"


def test_the_written_file_gets_the_usual_permissions(tmp_path):
    """mkstemp makes 0600 files; a record must be readable like any file the user's umask allows."""
    umask = os.umask(0o022)
    try:
        write_record(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(umask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
