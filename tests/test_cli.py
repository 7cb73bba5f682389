"""The three stages chained by `init_from` through the real `s2ap` CLI, then export."""

import json
import os
from pathlib import Path

import pytest
import torch

from s2ap_lightning.cli import main
from s2ap_lightning.export import sparsity_table
from s2ap_lightning.models import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: The settings every CLI test shares (tiny data, quiet CPU trainer, fixed seed).
FAST = Path(__file__).resolve().parent / "configs" / "cli_fast.yaml"


def cli(*args):
    # run with S2AP_DEBUG semantics: the project's errors propagate to the test
    from s2ap_lightning.cli import TOOLS, run_cli

    if args and args[0] in TOOLS:
        return TOOLS[args[0]](list(args[1:]))
    run_cli(list(args))
    return 0


def fit_args(stage_cfg, dirpath, *extra, configs=()):
    """``s2ap fit`` of a shipped stage config on the synthetic data (then ``configs``) into ``dirpath``."""
    args = ["fit"]
    for config in (CONFIGS / "stages" / stage_cfg, CONFIGS / "data" / "synthetic.yaml", *configs):
        args += ["--config", str(config)]
    return [*args, "--checkpoint.dirpath", str(dirpath), *extra]


def stage(tmp, name, stage_cfg, epochs, *extra):
    cli(*fit_args(stage_cfg, tmp / name, "--trainer.max_epochs", str(epochs), *extra, configs=[FAST]))
    assert (tmp / name / "best.ckpt").is_file() and (tmp / name / "last.ckpt").is_file()
    return tmp / name / "best.ckpt"


def prune_args(pretrained):
    return ["--model.init_from", str(pretrained), "--model.warmup_epochs", "1", "--model.sparsity", "0.8"]


@pytest.fixture(scope="module")
def chained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    pre = stage(tmp, "pretrain", "pretrain.yaml", 2)
    prune = stage(tmp, "s2ap", "s2ap.yaml", 2, *prune_args(pre))
    ft = stage(tmp, "finetune", "finetune.yaml", 1, "--model.init_from", str(prune))
    return tmp, pre, prune, ft


def test_prune_stage_starts_from_pretrained_weights(chained):
    _, pre, prune, _ = chained
    a = torch.load(pre, weights_only=True)["state_dict"]
    b = torch.load(prune, weights_only=True)["state_dict"]
    conv = "model.features.0.weight"
    assert torch.equal(a[conv], b[conv]), "mask search froze the pretrained weights"
    assert any(k.startswith("method.scores.") for k in b)
    ckpt = torch.load(prune, weights_only=True)
    assert ckpt["hyper_parameters"]["sparsity"] == 0.8
    assert "masks" in ckpt


def test_export_round_trip(chained, tmp_path, capsys):
    _, _, _, ft = chained
    out = tmp_path / "pruned.pt"
    assert cli("export", str(ft), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "features.0.weight" in printed and "global" in printed
    state = torch.load(out, weights_only=True)
    model = build_model("small_cnn", 4, 3)
    model.load_state_dict(state, strict=True)
    rows, global_sparsity = sparsity_table(model)
    masks = torch.load(ft, weights_only=True)["masks"]
    for name, kept, total, _ in rows:
        assert kept == int(masks[name].sum()) == round(0.2 * total)
        assert (state[name][~masks[name]] == 0).all()
    assert abs(global_sparsity - 0.8) < 0.01


def latest_record(ckpt):
    """The newest evaluation record of ``ckpt`` (a second evaluation writes ``.eval.2.json``)."""
    records = sorted(Path(ckpt).parent.glob(Path(ckpt).stem + ".eval*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(records[-1].read_text())


def run_test_subcommand(stage_cfg, ckpt, out_dir, *extra):
    """`s2ap test` on a checkpoint, synthetic data, writing into out_dir."""
    return cli(
        "test",
        "--config",
        str(CONFIGS / "stages" / stage_cfg),
        "--config",
        str(CONFIGS / "data" / "synthetic.yaml"),
        "--ckpt_path",
        str(ckpt),
        "--checkpoint.dirpath",
        str(out_dir),
        "--trainer.default_root_dir",
        str(out_dir),
        "--trainer.enable_progress_bar",
        "false",
        "--data.synthetic_samples",
        "128",
        *extra,
    )


def test_test_subcommand_on_finetuned_checkpoint(chained, capsys):
    tmp, _, _, ft = chained
    # AutoAttack runs in the second call only, on 3 images: the first checks the printed table.
    run_test_subcommand("finetune.yaml", ft, tmp / "test", "--model.evaluation.aa_images", "0")
    out = capsys.readouterr().out
    assert "test/robust_acc" in out and "test/clean_acc" in out
    # Evaluation settings given on the command line win over the checkpoint's training settings.
    run_test_subcommand(
        "finetune.yaml",
        ft,
        tmp / "test",
        "--model.evaluation.pgd_steps",
        "7",
        "--model.evaluation.aa_images",
        "3",
    )
    record = latest_record(ft)
    assert record["protocol"]["pgd_steps"] == 7 and record["n_aa_images"] == 3
    # The AutoAttack sample is class-stratified and recorded; synthetic data has 4 classes.
    assert sum(record["aa_class_counts"].values()) == 3 and len(record["aa_class_counts"]) == 3
    assert set(record["checks"]) >= {
        "aa_at_most_pgd",
        "more_steps_not_higher",
    }
    assert record["hyper_parameters"]["lr"] == 0.01, "everything else comes from the checkpoint"


def test_resume_same_stage_with_ckpt_path(chained, caplog):
    tmp, pre, prune, _ = chained
    last = tmp / "s2ap" / "last.ckpt"
    before = torch.load(last, weights_only=True)["global_step"]
    stage(tmp, "s2ap", "s2ap.yaml", 3, *prune_args(pre), "--ckpt_path", str(last))
    ckpt = torch.load(last, weights_only=True)
    assert before == 6, "last.ckpt is the end of epoch 2 of 2 (3 batches per epoch)"
    assert ckpt["global_step"] == 9 and ckpt["epoch"] == 2
    assert f"Restored all states from the checkpoint at {last}" in caplog.text
    assert "method.scores.features__0__weight" in ckpt["state_dict"]


def test_bad_sparsity_fails_fast_with_range(tmp_path):
    with pytest.raises(ValueError, match=r"sparsity=1.5.*\(0.0, 1.0\)"):
        cli(
            "fit",
            "--model",
            "ScoreSpaceSAMPruner",
            "--model.sparsity",
            "1.5",
            "--data.dataset",
            "synthetic",
            "--trainer.default_root_dir",
            str(tmp_path),
        )
    assert not any(tmp_path.iterdir())


def test_pick_by_validation_robust_accuracy(chained, capsys):
    tmp, pre, prune, ft = chained
    assert cli("pick", str(tmp / "pretrain"), str(tmp / "s2ap")) == 0
    out = capsys.readouterr().out
    assert "best:" in out and "gamma=0.01" in out


def test_analysis_commands_on_a_mask_search_checkpoint(chained, tmp_path, capsys):
    import json

    tmp, pre, prune, ft = chained
    assert (
        cli(
            "sharpness",
            str(prune),
            "--subset.images",
            "8",
            "--max_iter",
            "5",
            "--out",
            str(tmp_path / "s.json"),
        )
        == 0
    )
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["n_images"] == 8 and record["iterations"] <= 5
    assert (
        cli("landscape", str(prune), "--subset.images", "16", "--points", "5", "--out", str(tmp_path / "l"))
        == 0
    )
    assert (tmp_path / "l.png").stat().st_size > 1000 and (tmp_path / "l.npz").exists()
    assert cli("hamming", str(prune), str(ft), "--per_layer", "true") == 0
    out = capsys.readouterr().out
    assert "hamming (normalised): 0.000000" in out, "finetuning keeps the searched mask"
    assert (
        cli("security", str(ft), "--subset.images", "16", "--steps", "20", "--out", str(tmp_path / "sec"))
        == 0
    )
    curve = json.loads((tmp_path / "sec.json").read_text())
    assert curve["robust_acc"][0] >= curve["robust_acc"][-1]


def test_mask_robust_accuracy_is_s2ap_test_on_the_search_checkpoint(chained):
    import json

    from s2ap_lightning.checkpoint import load_file
    from s2ap_lightning.data import RobustDataModule
    from s2ap_lightning.export import pruned_state_dict

    tmp, _, prune, _ = chained
    run_test_subcommand(
        "s2ap.yaml", prune, tmp / "masktest", "--model.sparsity", "0.8", "--model.evaluation.aa_images", "0"
    )
    record = json.loads(prune.with_suffix(".eval.json").read_text())
    assert record["stage"] == "ScoreSpaceSAMPruner"
    # The figure is the pretrained weights under the searched mask: the exported masked model agrees.
    model, _ = pruned_state_dict(load_file(prune))
    dm = RobustDataModule("synthetic", batch_size=32, synthetic_samples=128)
    dm.setup()
    x = torch.stack([dm.test_set[i][0] for i in range(len(dm.test_set))])
    y = torch.tensor([int(dm.test_set[i][1]) for i in range(len(dm.test_set))])
    with torch.no_grad():
        clean = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert record["clean_acc"] == pytest.approx(clean, abs=1e-6)


def test_cli_best_checkpoint_skips_over_budget_epochs(tmp_path):
    """The CLI's best.ckpt callback is the budget-aware one: a HARP epoch outside its density band is
    never saved as "best", whatever its robust accuracy."""
    from s2ap_lightning.cli import run_cli
    from s2ap_lightning.stages.callbacks import BestCheckpoint

    cli_ = run_cli(
        [
            "--config", str(CONFIGS / "stages" / "s2ap.yaml"),
            "--config", str(CONFIGS / "data" / "synthetic.yaml"),
            "--model.method", "Harp",
            "--checkpoint.dirpath", str(tmp_path),
            "--trainer.logger", "false",
        ],
        run=False,
    )  # fmt: skip
    (best,) = [c for c in cli_.trainer.callbacks if isinstance(c, BestCheckpoint)]
    assert best.monitor == "val/robust_acc" and best.dirpath == str(tmp_path)
    pruner = cli_.model
    with torch.no_grad():
        for rate in pruner.method.rates.values():
            rate.fill_(3.0)  # every layer far over the target density
    assert not pruner.within_budget()
    assert not best._eligible(pruner)
    with torch.no_grad():
        for rate in pruner.method.rates.values():
            rate.fill_(float(torch.logit(torch.tensor((0.1 - 0.01) / 0.99))))  # back at the target
    assert pruner.within_budget() and best._eligible(pruner)


def test_fit_refuses_to_overwrite_a_finished_run(chained, tmp_path, capsys):
    tmp, pre, _, _ = chained
    before = (tmp / "pretrain" / "best.ckpt").read_bytes()
    with pytest.raises(
        FileExistsError, match=r"already holds a run \(best.ckpt, last.ckpt\).*--ckpt_path last"
    ):
        stage(tmp, "pretrain", "pretrain.yaml", 1)
    assert (tmp / "pretrain" / "best.ckpt").read_bytes() == before, "the finished run was touched"
    # Through the command: one readable line, exit status 2, no traceback.
    assert main(fit_args("pretrain.yaml", tmp / "pretrain")) == 2
    err = capsys.readouterr().err
    assert "s2ap: error: checkpoint.dirpath=" in err and "Traceback" not in err
    # An explicit overwrite is honoured.
    stage(tmp_path, "again", "pretrain.yaml", 1)
    stage(tmp_path, "again", "pretrain.yaml", 1, "--overwrite", "true")


def test_export_refuses_to_replace_a_file(chained, tmp_path):
    _, _, _, ft = chained
    out = tmp_path / "pruned.pt"
    out.write_bytes(b"keep me")
    assert main(["export", str(ft), "--out", str(out)]) == 2
    assert out.read_bytes() == b"keep me"
    assert main(["export", str(ft), "--out", str(out), "--overwrite", "true"]) == 0


@pytest.mark.parametrize(
    ("tool", "written", "extra"),
    [
        ("sharpness", "s.json", ["--max_iter", "2"]),
        ("landscape", "s.npz", ["--points", "3"]),
        ("security", "s.png", ["--steps", "5"]),
    ],
)
def test_analysis_tools_refuse_to_replace_a_result(chained, tmp_path, capsys, tool, written, extra):
    _, _, prune, _ = chained
    kept = tmp_path / written
    kept.write_bytes(b"keep me")
    prefix = str(tmp_path / "s.json") if tool == "sharpness" else str(tmp_path / "s")
    args = [tool, str(prune), "--subset.images", "8", "--out", prefix, *extra]
    assert main(args) == 2
    assert f"{kept} exists" in capsys.readouterr().err and kept.read_bytes() == b"keep me"
    assert main([*args, "--overwrite", "true"]) == 0
    assert kept.read_bytes() != b"keep me"


def test_pick_help_is_help(capsys):
    # The run list ends at the first option, short ones too (-h once became a run named "-h").
    with pytest.raises(SystemExit) as exit_info:
        main(["pick", "-h"])
    assert exit_info.value.code == 0
    assert "by best validation robust accuracy" in capsys.readouterr().out


def test_run_folder_holds_logs_config_and_readable_checkpoints(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        extra = ["--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"]
        extra += ["--data.synthetic_samples", "64"]
        args = fit_args("pretrain.yaml", "runs/mine", *extra, configs=[CONFIGS / "trainer" / "cpu.yaml"])
        assert main(args) == 0
    finally:
        os.umask(old)
    run = tmp_path / "runs" / "mine"
    assert not (tmp_path / "lightning_logs").exists(), "nothing written into the working directory"
    assert list(run.glob("lightning_logs/version_*/config.yaml")), "logs and config beside the checkpoints"
    assert (run / "best.ckpt").stat().st_mode & 0o777 == 0o644, "checkpoints follow the umask"
    out = capsys.readouterr().out
    assert (
        "RobustPretrainer epoch 1/2" in out
        and "RobustPretrainer epoch 2/2" in out
        and "val/robust_acc" in out
    )


def test_report_from_any_runs_test_records(chained, tmp_path):
    tmp, _, prune, ft = chained
    run_test_subcommand("s2ap.yaml", prune, tmp / "test_prune", "--model.evaluation.aa_images", "0")
    run_test_subcommand("finetune.yaml", ft, tmp / "test_ft", "--model.evaluation.aa_images", "0")
    assert cli("report", str(tmp), "--overwrite", "true") == 0
    text = (tmp / "report.md").read_text()
    assert "`s2ap/best.eval.json` | ScoreSpaceSAMPruner | hydra | 0.8 |" in text
    assert "`finetune/best.eval.json` | MaskedFinetuner |" in text
    with pytest.raises(FileNotFoundError, match=r"holds no evaluation records .*s2ap test --ckpt_path"):
        cli("report", str(tmp_path))
    assert main(["report", str(tmp)]) == 2, "an existing report.md is not replaced without --overwrite"


def test_test_keeps_the_trained_threat_model_and_every_record(tmp_path, capsys):
    """Trained at eps 0.05 (explicitly; the class default is 8/255): tested at 0.05 unless told."""
    fast = ["--config", str(CONFIGS / "stages" / "pretrain.yaml"), "--config", str(FAST)]
    run = tmp_path / "run"
    cli("fit", *fast, "--trainer.max_epochs", "1", "--model.threat.eps", "0.05", "--model.threat.step_size", "0.02",
        "--checkpoint.dirpath", str(run))  # fmt: skip
    ckpt = run / "best.ckpt"
    test = [
        "test",
        *fast,
        "--ckpt_path",
        str(ckpt),
        "--model.evaluation.aa_images",
        "0",
        "--checkpoint.dirpath",
        str(run),
    ]
    capsys.readouterr()
    cli(*test)
    first = json.loads((run / "best.eval.json").read_text())
    assert first["threat_model"]["eps"] == 0.05 and first["threat_model"]["step_size"] == 0.02
    assert first["trained_threat_model"]["eps"] == 0.05
    out = capsys.readouterr().out
    assert "threat model: linf eps 0.05; PGD-" in out and "NOT the training" not in out
    assert "test/eps" in out, "the budget stands in the table beside the figures"
    before = (run / "best.eval.json").read_bytes()

    cli(*test, "--model.threat.eps", "0.2", "--model.threat.step_size", "0.05")
    assert (run / "best.eval.json").read_bytes() == before, "the first record is never replaced"
    second = json.loads((run / "best.eval.2.json").read_text())
    assert second["threat_model"]["eps"] == 0.2
    assert second["hyper_parameters"]["threat"]["eps"] == 0.05, (
        "the record says what the model was trained at"
    )
    assert second["trained_threat_model"]["eps"] == 0.05
    assert "NOT the training threat model (linf eps 0.05)" in capsys.readouterr().out

    # The report keeps the two budgets apart: one table each, the eps in its heading.
    assert cli("report", str(run)) == 0
    text = (run / "report.md").read_text()
    assert "## dataset `synthetic`, linf eps 0.05" in text and "## dataset `synthetic`, linf eps 0.2" in text
    assert "`best.eval.2.json`" in text


def test_test_without_a_checkpoint_is_refused(tmp_path, capsys):
    args = ["test", "--config", str(CONFIGS / "stages" / "finetune.yaml"), "--config", str(FAST),
            "--checkpoint.dirpath", str(tmp_path)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "without --ckpt_path (or --model.init_from) would evaluate an untrained network" in err
    assert not list(tmp_path.rglob("*.json")), "nothing evaluated, nothing written"


def test_resume_with_changed_run_settings_is_refused(chained, tmp_path, capsys):
    """At an epoch's end (last.ckpt) as mid-epoch: another gamma, sparsity or seed is another run."""
    _, pre, prune, _ = chained
    run = tmp_path / "s2ap"
    import shutil

    run.mkdir()
    shutil.copy(prune.with_name("last.ckpt"), run / "last.ckpt")
    before = (run / "last.ckpt").read_bytes()

    def resume(*extra):
        args = fit_args(
            "s2ap.yaml", run, "--trainer.max_epochs", "3", *prune_args(pre), *extra, configs=[FAST]
        )
        return main(args)

    assert resume("--ckpt_path", "last", "--model.gamma", "0.05") == 2
    assert "settings that define it changed (gamma: 0.01 -> 0.05)" in capsys.readouterr().err
    assert resume("--ckpt_path", str(run / "last.ckpt"), "--model.sparsity", "0.9") == 2
    assert "(sparsity: 0.8 -> 0.9)" in capsys.readouterr().err, "a named file would drop it silently"
    assert resume("--ckpt_path", "last", "--model.method", "Hydra", "--model.method.scope", "global") == 2
    assert "'scope': 'layer'" in capsys.readouterr().err, "a method option is part of the run"
    assert resume("--ckpt_path", "last", "--seed_everything", "5") == 2
    assert "seed_everything: 0 -> 5" in capsys.readouterr().err
    assert (run / "last.ckpt").read_bytes() == before, "nothing resumed, nothing written"
    # The same settings resume; --overwrite true takes the new ones on purpose.
    assert resume("--ckpt_path", "last") == 0
    assert resume("--ckpt_path", "last", "--model.gamma", "0.05", "--trainer.max_epochs", "4",
                  "--overwrite", "true") == 0  # fmt: skip
