import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from s2ap_lightning.analysis.landscape import landscape_1d, landscape_2d
from s2ap_lightning.analysis.objective import SearchObjective, fixed_adversarial
from s2ap_lightning.analysis.sharpness import hessian_max_eigenvalue, score_space_sharpness
from s2ap_lightning.analysis.stability import (
    MaskHammingDistance,
    hamming,
    load_masks,
    pack_masks,
    unpack_masks,
)
from s2ap_lightning.pruning.methods import method_from_config
from s2ap_lightning.stages import ScoreSpaceSAMPruner


def test_power_iteration_finds_known_eigenvalue():
    a = torch.diag(torch.tensor([5.0, 2.0, -1.0, 0.5]))
    b = torch.diag(torch.tensor([3.0, 1.0]))
    q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))[0]
    a = q @ a @ q.T  # not diagonal in the canonical basis

    def loss(p):
        return 0.5 * p[0] @ a @ p[0] + 0.5 * p[1] @ b @ p[1] + (p[0] ** 3).sum() * 0

    result = hessian_max_eigenvalue(loss, [torch.ones(4), torch.ones(2)], max_iter=200, tol=1e-6)
    assert result.converged
    assert abs(result.value - 5.0) < 1e-3


def test_power_iteration_respects_cap():
    a = torch.diag(torch.tensor([1.0, 0.999, 0.998]))
    result = hessian_max_eigenvalue(lambda p: 0.5 * p[0] @ a @ p[0], [torch.ones(3)], max_iter=3, tol=1e-12)
    assert result.iterations == 3 and not result.converged


@pytest.fixture
def pruner(fast_kwargs):
    torch.manual_seed(0)
    return ScoreSpaceSAMPruner(sparsity=0.7, **fast_kwargs)


def test_score_space_sharpness_leaves_model_untouched(pruner):
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))
    state = {k: v.clone() for k, v in pruner.state_dict().items()}
    report = score_space_sharpness(pruner.objective(), x, y, rho=0.05, max_iter=10)
    assert np.isfinite(report.lambda_max) and np.isfinite(report.sharpness)
    assert report.n_images == 16 and report.worst_loss == pytest.approx(report.loss + report.sharpness)
    for k, v in pruner.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("loss", ["trades", "mart"])
def test_sharpness_is_taken_on_the_loss_the_search_used(fast_kwargs, loss):
    import torch.nn.functional as F

    from s2ap_lightning.attacks.pgd import eval_mode
    from s2ap_lightning.pruning.masks import straight_through, topk_mask
    from s2ap_lightning.pruning.scores import masked_forward

    torch.manual_seed(0)
    pruner = ScoreSpaceSAMPruner(sparsity=0.7, robust_loss=loss, beta=6.0, **fast_kwargs)
    with torch.no_grad():  # peaked outputs, so clean and adversarial predictions differ
        pruner.model.classifier.weight.mul_(30)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))
    report = score_space_sharpness(pruner.objective(), x, y, rho=0.05, max_iter=3, seed=3)
    # By hand: the loss's own adversary at s, then that loss of w * M(s) in eval mode.
    x_adv = fixed_adversarial(pruner.objective(), x, y, seed=3)
    params = dict(pruner.model.named_parameters())
    counts = pruner.method.kept_counts()
    weights = {
        n: params[n].detach() * straight_through(topk_mask(s, counts[n]), s) for n, s in pruner.method.items()
    }
    with eval_mode(pruner.model):
        expected = pruner.robust_loss(
            lambda inp: masked_forward(pruner.model, weights, inp), x, x_adv, y
        ).loss
        plain_ce = F.cross_entropy(masked_forward(pruner.model, weights, x_adv), y)
    assert report.loss == pytest.approx(float(expected), rel=1e-5)
    assert abs(report.loss - float(plain_ce)) > 1e-3, "not the plain cross-entropy"


def test_landscape_centre_is_the_unperturbed_loss(pruner, tmp_path):
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))
    one = landscape_1d(pruner.objective(), x, y, alphas=[-0.5, 0.0, 0.5])
    assert one.flips[1] == 0 and one.flips[0] > 0 and one.flips[2] > 0
    two = landscape_2d(pruner.objective(), x, y, alphas=[-0.5, 0.0, 0.5])
    assert two.loss.shape == (3, 3) and two.flips[1, 1] == 0
    assert two.loss[1, 1] == pytest.approx(one.loss[1], rel=1e-5)
    two.save(str(tmp_path / "l2"))
    two.plot(str(tmp_path / "l2.png"))
    assert (tmp_path / "l2.png").stat().st_size > 1000 and (tmp_path / "l2.npz").exists()


class _OnlyTheProtocol:
    """A base method reduced to the four operations of ``ScoreMethod``: no layer names, no indexing,
    no module, so an analysis that reached past the protocol would fail on it."""

    def __init__(self, method):
        self._method = method

    def items(self):
        return self._method.items()

    def masks(self):
        return self._method.masks()

    def effective_weights(self, model, masks, differentiable=True):
        return self._method.effective_weights(model, masks, differentiable)

    def weights_at(self, model, point, differentiable=True):
        return self._method.weights_at(model, point, differentiable)


def test_analyses_need_only_the_objective_and_the_method_protocol(pruner):
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))
    full = pruner.objective()
    bare = SearchObjective(full.model, _OnlyTheProtocol(full.method), full.loss, full.adversary)
    sharp_full = score_space_sharpness(full, x, y, rho=0.05, max_iter=3, seed=1).as_dict()
    sharp_bare = score_space_sharpness(bare, x, y, rho=0.05, max_iter=3, seed=1).as_dict()
    assert sharp_bare == pytest.approx(sharp_full, rel=1e-6)
    slice_full = landscape_1d(full, x, y, alphas=[-0.5, 0.0, 0.5], seed=1)
    slice_bare = landscape_1d(bare, x, y, alphas=[-0.5, 0.0, 0.5], seed=1)
    np.testing.assert_allclose(slice_bare.loss, slice_full.loss, rtol=1e-6)
    np.testing.assert_array_equal(slice_bare.flips, slice_full.flips)


@pytest.mark.parametrize("base_method", ["hydra", "harp"])
def test_objective_is_the_function_the_stage_searches_and_evaluates(fast_kwargs, base_method):
    torch.manual_seed(0)
    method = method_from_config(base_method)
    pruner = ScoreSpaceSAMPruner(sparsity=0.7, method=method, robust_loss="trades", **fast_kwargs)
    objective = pruner.objective()
    assert objective.model is pruner.model and objective.loss is pruner.robust_loss
    assert objective.adversary == pruner.threat and objective.adversary.eps == fast_kwargs["threat"].eps
    evaluated, expected = objective.evaluated_weights(), pruner.evaluated_weights()
    assert evaluated.keys() == expected.keys()
    for name, weight in evaluated.items():
        assert torch.equal(weight, expected[name]) and not weight.requires_grad, name


def test_search_objective_refuses_a_method_without_the_mask_operations(pruner):
    full = pruner.objective()

    class NoWeightsAt:
        items, masks = full.method.items, full.method.masks

    with pytest.raises(TypeError, match="NoWeightsAt lacks effective_weights, weights_at"):
        SearchObjective(full.model, NoWeightsAt(), full.loss, full.adversary)


def test_mask_tracker_logs_and_saves_the_mask_of_every_epoch(tmp_path, fast_kwargs, trainer_factory):
    from torch.utils.data import DataLoader, TensorDataset

    from s2ap_lightning.stages.callbacks import MaskStabilityCallback

    torch.manual_seed(0)
    pruner = ScoreSpaceSAMPruner(sparsity=0.7, warmup_epochs=0, lr=1.0, **fast_kwargs)
    tracker = MaskStabilityCallback(dirpath=str(tmp_path))
    loader = DataLoader(TensorDataset(torch.rand(32, 3, 8, 8), torch.randint(0, 4, (32,))), batch_size=16)
    trainer = trainer_factory(max_epochs=2, limit_val_batches=0, callbacks=[tracker])
    trainer.fit(pruner, train_dataloaders=loader)
    # The configured tracker replaced the stage's default one rather than running beside it.
    assert [c for c in trainer.callbacks if isinstance(c, MaskStabilityCallback)] == [tracker]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_000.pt", "epoch_001.pt", "init.pt"]
    saved = [load_masks(tmp_path / f"{tag}.pt") for tag in ("init", "epoch_000", "epoch_001")]
    assert [h["epoch"] for h in tracker.history] == [0, 1]
    for entry, before, after in zip(tracker.history, saved[:-1], saved[1:], strict=True):
        total, per_layer = hamming(before, after)
        assert entry["hamming"] == total and entry["per_layer"] == per_layer
    assert tracker.history[0]["hamming"] > 0, "the scores moved: some weights changed sides"
    final = pruner.objective().method.masks()
    assert all(torch.equal(saved[-1][n].bool(), m.bool()) for n, m in final.items())
    assert trainer.callback_metrics["mask/hamming"] == pytest.approx(tracker.history[-1]["hamming"])


def test_the_old_tracker_path_names_the_new_one():
    import s2ap_lightning.analysis.stability as stability

    new_path = r"class_path: s2ap_lightning\.stages\.callbacks\.MaskStabilityCallback"
    with pytest.warns(FutureWarning, match=new_path), pytest.raises(ImportError, match=new_path):
        from s2ap_lightning.analysis.stability import MaskStabilityCallback  # noqa: F401
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        stability.not_a_name  # noqa: B018


@pytest.mark.parametrize("package", ["analysis.stability", "stages.callbacks"])
def test_a_config_naming_the_tracker_parses_or_says_where_it_went(tmp_path, capsys, package):
    from s2ap_lightning.cli import main

    config = tmp_path / "tracker.yaml"
    config.write_text(
        f"trainer:\n  callbacks:\n    - class_path: s2ap_lightning.{package}.MaskStabilityCallback\n"
        "      init_args:\n        save_masks: false\n"
    )
    argv = ["fit", "--model", "ScoreSpaceSAMPruner", "--config", str(config), "--print_config"]
    if package == "stages.callbacks":
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code in (0, None)
        assert "class_path: s2ap_lightning.stages.callbacks.MaskStabilityCallback" in capsys.readouterr().out
        return
    with pytest.warns(FutureWarning, match="s2ap_lightning.stages.callbacks.MaskStabilityCallback"):
        assert main(argv) != 0


def test_hamming_metric_and_packing(tmp_path):
    a = {"l1": torch.tensor([1.0, 0.0, 1.0, 0.0]), "l2": torch.ones(2, 3)}
    b = {"l1": torch.tensor([1.0, 1.0, 1.0, 0.0]), "l2": torch.ones(2, 3)}
    total, per_layer = hamming(a, b)
    assert total == pytest.approx(1 / 10) and per_layer == {"l1": 0.25, "l2": 0.0}
    metric = MaskHammingDistance()
    metric.update(a["l1"], b["l1"])
    assert float(metric.compute()) == 0.25
    metric.update(a["l2"], b["l2"])
    assert float(metric.compute()) == pytest.approx(total)
    with pytest.raises(ValueError, match="mask shapes differ"):
        metric.update(a["l1"], b["l2"])
    with pytest.raises(ValueError, match="different layers"):
        hamming(a, {"l1": b["l1"]})
    assert all(torch.equal(unpack_masks(pack_masks(a))[k], a[k]) for k in a)
    torch.save({"format": "s2ap-packed-masks", "masks": pack_masks(a)}, tmp_path / "a.pt")
    assert torch.equal(load_masks(tmp_path / "a.pt")["l2"], a["l2"])


def test_security_curve_matches_analytic_distances():
    from s2ap_lightning.analysis.security import minimum_norm_distances, security_curve

    torch.manual_seed(0)

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 3, 8, 8))

        def forward(self, x):
            z = ((x - 0.5) * self.w).flatten(1).sum(1, keepdim=True)
            return torch.cat([z, -z], 1)

    model = Linear()
    x = torch.rand(32, 3, 8, 8)
    y = model(x).argmax(1)
    d = minimum_norm_distances(model, x, y, steps=200)
    true = (((x - 0.5) * model.w).flatten(1).sum(1).abs() / model.w.abs().sum()).detach().numpy()
    assert (d >= true * (1 - 1e-3)).all(), "a perturbation smaller than the minimum is impossible"
    assert (d <= true * 1.1).all(), "FMN finds nearly minimal perturbations"
    curve = security_curve(model, x, y, [0.0, float(np.median(true)), 1.0], steps=200)
    assert curve.robust_acc[0] == 1.0 and curve.robust_acc[-1] == 0.0
    assert 0.3 < curve.robust_acc[1] < 0.7


def test_report_from_runs_folder(tmp_path, fast_kwargs):
    from s2ap_lightning.analysis.report import write_report
    from s2ap_lightning.models import build_model
    from s2ap_lightning.pruning import Hydra

    rows = []
    for method in ("hydra", "s2ap"):
        for sp in (0.9, 0.99):
            folder = tmp_path / f"{method}_sp{sp:g}"
            (folder / "masks").mkdir(parents=True)
            model = build_model("small_cnn", 10, 1)
            scores = Hydra().build(model, sp)
            for tag in ("init", "epoch_000", "epoch_001"):
                with torch.no_grad():
                    for _, s in scores.items():
                        s.add_(0.01 * torch.randn_like(s))
                torch.save(
                    {"format": "s2ap-packed-masks", "masks": pack_masks(scores.masks())},
                    folder / "masks" / f"{tag}.pt",
                )
            state = model.state_dict()
            for n, m in scores.masks().items():
                state[n] = state[n] * m
            torch.save(state, folder / "pruned_model.pt")
            rows.append(
                {
                    "method": method,
                    "sparsity": sp,
                    "seed": 0,
                    "clean_acc": 0.9,
                    "pgd_acc": 0.5,
                    "aa_acc": 0.45,
                    "n_test": 10,
                    "n_aa": 10,
                    "mask_pgd_acc": 0.4,
                    "mask_hamming_last_epoch": 0.01,
                    "lambda_max": 2.0,
                    "sharpness": 0.1,
                }
            )
    with open(tmp_path / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = write_report(tmp_path)
    text = report.read_text()
    assert text.count("| hydra |") == 2 and "lambda_max" in text
    for png in ("robust_vs_sparsity.png", "hamming_per_epoch.png", "lambda_max.png", "layer_sparsity.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
        assert png in text


def test_evaluation_json_beside_checkpoint(tmp_path, fast_kwargs, synthetic_dm, trainer_factory):
    from s2ap_lightning.stages import RobustPretrainer

    model = RobustPretrainer(aa_images=8, **fast_kwargs)
    trainer = trainer_factory(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=synthetic_dm)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    trainer.test(model, datamodule=synthetic_dm, ckpt_path=str(ckpt), weights_only=True)
    record = json.loads((tmp_path / "model.eval.json").read_text())
    assert record["n_images"] == len(synthetic_dm.test_set) and record["n_aa_images"] == 8
    assert record["eps0_acc"] == record["clean_acc"]
    assert record["pgd_acc"] <= record["clean_acc"] and record["aa_acc"] is not None
    assert set(record["checks"]) >= {"pgd_at_most_clean", "eps0_equals_clean", "more_steps_not_higher"}
    assert record["dataset"]["dataset"] == "synthetic" and record["git_commit"]
    assert record["hyper_parameters"]["threat"]["eps"] == fast_kwargs["threat"].eps
