"""``s2ap demo`` (the Quickstart's first command) at toy size: its table, and it never overwrites."""

from __future__ import annotations

import csv

from s2ap_lightning.cli import main

TINY = [
    "--pretrain_epochs", "1", "--prune_epochs", "1", "--warmup_epochs", "0", "--finetune_epochs", "1",
    "--sparsities", "[0.9]", "--pgd_steps", "2", "--aa_images", "0", "--progress", "false",
]  # fmt: skip


def test_demo_writes_its_table_and_refuses_to_overwrite_it(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], float(r["sparsity"])) for r in rows] == [
        ("dense", 0),
        ("hydra", 0.9),
        ("s2ap", 0.9),
    ]
    assert all(
        0.0 <= float(r["clean_acc"]) <= 1.0 and float(r["pgd_acc"]) <= float(r["clean_acc"]) for r in rows
    )
    for r in rows[1:]:  # the masks keep 10 % of every layer: exact zeros in the evaluated network
        assert abs(float(r["global_sparsity"]) - 0.9) < 1e-3
    assert (out / "report.md").is_file() and (out / "pretrain" / "best.ckpt").is_file()
    capsys.readouterr()

    # A second demo into the same folder is refused before any work, naming the folder; nothing changes.
    before = {p: p.read_bytes() for p in (out / "results.csv", out / "pretrain" / "best.ckpt")}
    assert main(["demo", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"out={str(out)!r} already holds" in err and "--overwrite true" in err
    assert {p: p.read_bytes() for p in before} == before

    # Asked for explicitly, it replaces them.
    assert main(["demo", "--out", str(out), "--overwrite", "true", *TINY]) == 0
