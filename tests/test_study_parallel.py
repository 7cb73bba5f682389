"""Issue 20 with training, on the tiny synthetic study: both finetuning arms, extra seeds, and the local
launcher's worker processes (the same results as one process, a killed study resumed, a failing cell
named with its dependants skipped)."""

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import yaml

from s2ap_lightning.jobs import study as study_mod
from s2ap_lightning.jobs.cells import Cell, StudySpec, cells_of, read_result, result_path, weights_hash
from s2ap_lightning.jobs.study import CellsFailed, run_study

ROOT = Path(__file__).resolve().parents[1]
#: What a cell measured; everything else (paths, wall time, commit) may differ between two runs.
MEASURED = ("clean_acc", "pgd_acc", "aa_acc", "val_mask_pgd_acc", "mask_pgd_acc", "mask_hamming_last_epoch",
            "global_sparsity", "collapsed", "gamma", "finetune", "weights_sha256", "init_sha256",
            "gamma_val_scores", "search_cell")  # fmt: skip


def spec_of(out, **changes):
    """The tiny study with two arms and an extra seed at 0.8, one torch thread per process (so that one
    process and two give bit-identical results), one epoch per stage."""
    raw = yaml.safe_load((ROOT / "tests" / "configs" / "study_tiny.yaml").read_text())
    raw.update(
        data_config=str(ROOT / raw["data_config"]),
        out=str(out),
        seeds=[1],
        sparsities=[0.5, 0.8],
        extra_seeds={0.8: [2]},
        gammas=[0.01],
        finetune_arms=["plain", "awp"],
        pretrain_epochs=1,
        prune_epochs=1,
        warmup_epochs=0,
        sharpness_images=0,
        threads=1,
    )
    raw.update(changes)
    return StudySpec(**raw)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    spec = spec_of(tmp_path_factory.mktemp("serial"))
    run_study(spec)
    return spec


def measured(spec, keys=None):
    """Per cell (of ``keys``): its measured figures and the weights it ended with (its checkpoint's hash)."""
    out = {}
    for cell in (c for wave in cells_of(spec) for c in wave if keys is None or c.key in keys):
        result = read_result(spec, cell)
        out[cell.key] = {k: result.get(k) for k in MEASURED} | {"weights": weights_hash(result["checkpoint"])}
    return out


def test_each_arm_finetunes_the_same_masks_with_its_own_recipe(serial):
    spec = serial
    assert len([c for wave in cells_of(spec) for c in wave]) == 2 + 3 * 2 + 3 * 2 * 2
    for seed, sp in ((1, 0.5), (1, 0.8), (2, 0.8)):
        for variant in ("base", "s2ap"):
            plain, awp = (
                read_result(spec, Cell.finetune(seed, "hydra", sp, variant, a)) for a in ("plain", "awp")
            )
            assert plain["search_cell"] == awp["search_cell"] and (plain["finetune"], awp["finetune"]) == (
                "plain",
                "awp",
            )
            for result, awp_gamma in ((plain, 0.0), (awp, spec.awp_gamma)):
                hparams = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)[
                    "hyper_parameters"
                ]
                assert hparams["awp_gamma"] == awp_gamma
    assert read_result(spec, Cell.search(2, "hydra", 0.5, 0.0)) is None, "seed 2 runs at 0.8 only"
    text = (spec.folder / "study.md").read_text()
    assert "![regime](regime.png)" in text and (spec.folder / "regime.png").is_file()
    assert "| hydra | 0.8 | 0 (base) | 2 |" in text, "the extra seed counts at 0.8"


def live_group_members(pgid):
    """Processes of process group ``pgid`` that are still running (zombies are dead)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.slow  # about 30 s on 2 cores: a launcher and two workers started twice
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")
def test_a_killed_parallel_study_resumes_to_the_results_of_one_process(serial, tmp_path):
    spec = replace(serial, out=str(tmp_path), workers=2)
    (tmp_path / "spec_in.yaml").write_text(yaml.safe_dump(asdict(spec)))
    code = "import sys; from s2ap_lightning.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-c", code, "study", "--config", str(tmp_path / "spec_in.yaml")],
        env=env,
        start_new_session=True,  # its own process group: the workers can be found after the kill
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cells = [c for wave in cells_of(spec) for c in wave]
    deadline = time.monotonic() + 300
    while not any(result_path(spec, c).is_file() for c in cells):
        assert launcher.poll() is None and time.monotonic() < deadline, "the study never finished a cell"
        time.sleep(0.05)
    launcher.kill()  # the launcher alone, as a lost session would: its workers must not run on unseen
    launcher.wait()
    while live_group_members(launcher.pid):
        assert time.monotonic() < deadline, "worker processes outlived their launcher"
        time.sleep(0.2)

    done = {c.key: result_path(spec, c).stat().st_mtime_ns for c in cells if result_path(spec, c).is_file()}
    assert 0 < len(done) < len(cells)
    half = next(c for c in cells if c.key not in done and c.kind == "search")
    (spec.folder / "runs" / half.key).mkdir(parents=True, exist_ok=True)
    (spec.folder / "runs" / half.key / "best.ckpt").write_text("half-written")  # a cell killed mid-way

    assert run_study(spec) is not None
    assert {k: result_path(spec, c).stat().st_mtime_ns for c in cells for k in [c.key] if k in done} == done
    assert read_result(spec, half)["checkpoint"] and weights_hash(read_result(spec, half)["checkpoint"])
    # Bit-identical to one process: every figure and every checkpoint's weights.
    assert measured(spec) == measured(serial)


def test_a_failing_cell_is_named_and_only_its_dependants_are_skipped(serial, tmp_path, capfd):
    spec = spec_of(tmp_path, sparsities=[0.8], finetune_arms=None, workers=2)
    for seed in (1, 2):  # the pretrainings of the serial study; seed 2's checkpoint has gone
        result = read_result(serial, Cell.pretrain(seed))
        if seed == 2:
            result["checkpoint"] = str(tmp_path / "gone" / "best.ckpt")
        path = result_path(spec, Cell.pretrain(seed))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    with pytest.raises(CellsFailed) as failure:
        run_study(spec)
    message = str(failure.value)
    assert message.startswith("2 cell(s) of study tiny failed and 2 that depend on them did not run:")
    assert "  seed2/search/hydra_sp0.8_g0: CheckpointError: checkpoint " in message and "gone" in message
    assert "run the same command again to resume" in message
    log = tmp_path / "runs" / "seed2" / "search" / "hydra_sp0.8_g0" / "error.log"
    assert "Traceback" in log.read_text()
    out, err = capfd.readouterr()  # the launcher's and its worker processes' output
    assert "ScoreSpaceSAMPruner epoch 1/1" in out, "the workers' own output is in what was read"
    assert "cell seed2/search/hydra_sp0.8_g0 FAILED: CheckpointError" in out
    # The workers silence what the CLI silences (quiet.py), e.g. a deprecation inside Lightning.
    assert "LeafSpec" not in err and "litlogger" not in out + err
    finished = {c.key for wave in cells_of(spec) for c in wave if read_result(spec, c) is not None}
    assert {c.key for c in cells_of(spec)[2] if c.seed == 1} <= finished, "seed 1 ran to the end"
    assert not any(k.startswith("seed2/finetune") for k in finished)
    assert not (tmp_path / "study.md").exists()
    # What the workers ran is what one process ran (the serial study's plain arm), bit for bit.
    ran, reference = measured(spec, {k for k in finished if k.startswith("seed1/")}), measured(serial)
    for key, figures in ran.items():
        assert figures == reference[key + ("_plain" if "/finetune/" in key else "")], key


def test_worker_threads_share_the_cores(serial, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert study_mod.worker_threads(replace(serial, threads=0, workers=2)) == 4
    assert study_mod.worker_threads(replace(serial, threads=0, workers=16)) == 1
    assert study_mod.worker_threads(replace(serial, threads=3, workers=2)) == 3
