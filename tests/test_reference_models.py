"""Our ResNet-18, VGG-16-bn, WRN-28-4 and ResNet-50 against the paper's reference classes.

The reference key/shape lists are committed data (``tests/data/reference_models/reference_keys.json``,
written by ``make_reference_keys.py`` in that folder from HYDRA, HARP and the adversarial pruning
benchmark at the commits it records), so these tests need no reference code. The same script checks
strict loading and equal logits against the real classes; ``test_against_the_real_classes`` runs it
when ``S2AP_REFERENCE_REPOS`` names a folder with ``hydra``, ``harp`` and ``AdversarialPruningBenchmark``
checkouts.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from s2ap_lightning.checkpoint import CheckpointError, read_init_source, reference_masks
from s2ap_lightning.export import export, reference_state_dict
from s2ap_lightning.models import build_model
from s2ap_lightning.stages import MaskedFinetuner, RobustPretrainer, ScoreSpaceSAMPruner

DATA = Path(__file__).resolve().parent / "data" / "reference_models"
REFERENCE = json.loads((DATA / "reference_keys.json").read_text())
PAIRS = sorted(REFERENCE["models"])


def shapes_of(state):
    return {k: list(v.shape) for k, v in state.items()}


def ours(arch, num_classes):
    torch.manual_seed(0)
    return build_model(arch, num_classes, 3)


@pytest.mark.parametrize("pair", PAIRS)
def test_our_export_has_the_reference_keys_and_shapes(pair):
    entry = REFERENCE["models"][pair]
    reference, arch = pair.split("/")
    model = ours(arch, entry["num_classes"])
    exported = reference_state_dict(model.state_dict(), arch, reference)
    expected = dict((k, shape) for k, shape in entry["keys"])
    assert shapes_of(exported) == expected
    if exported.keys() == model.state_dict().keys():
        # Same module order too: the classes are defined layer for layer as the references'.
        assert list(exported) == [k for k, _ in entry["keys"]]


@pytest.mark.parametrize("pair", PAIRS)
def test_parameter_counts(pair):
    entry = REFERENCE["models"][pair]
    reference, arch = pair.split("/")
    count = sum(p.numel() for p in ours(arch, entry["num_classes"]).parameters())
    if pair == "hydra/wrn28_4":
        # HYDRA's WRN also builds sub_block1 (a copy of block1 its forward never calls).
        block1 = sum(p.numel() for p in ours(arch, 10).block1.parameters())
        assert count + block1 == entry["parameters"]
    else:
        assert count == entry["parameters"]


def test_the_architectures_the_issue_named():
    counts = {a: sum(p.numel() for p in ours(a, 10).parameters()) for a in ("vgg16_bn", "wrn28_4")}
    assert counts == {"vgg16_bn": 15_311_818, "wrn28_4": 5_849_050}
    vgg = ours("vgg16_bn", 10).state_dict()
    conv_biases = [k for k in vgg if k.endswith(".bias") and vgg[k[: -len("bias")] + "weight"].dim() == 4]
    assert conv_biases == [], "VGG convolutions carry no bias (BatchNorm follows each)"


# ---------------------------------------------------------------- reference checkpoints -> init_from
def reference_checkpoint(pair, pruned, seed=0, wrapper="state_dict"):
    """A file laid out as HYDRA's/HARP's/the benchmark's ``save_checkpoint`` writes it, random values."""
    entry = REFERENCE["models"][pair]
    g = torch.Generator().manual_seed(seed)
    keys = entry["keys"] + (entry.get("pruned_extra_keys", []) if pruned else [])
    state = {}
    for key, shape in keys:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g)
    return {
        "epoch": 20,
        "arch": pair.split("/")[1],
        wrapper: state,
        "best_prec1": 41.5,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
    }


def stage(cls, path, arch="resnet18", **kwargs):
    module = cls(model=arch, num_classes=10, in_channels=3, init_from=str(path), **kwargs)
    module.trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return module


STAGES = {
    "pretrain": (RobustPretrainer, {}),
    "search": (ScoreSpaceSAMPruner, {"sparsity": 0.9}),
    "finetune": (MaskedFinetuner, {"reference_k": 0.1}),
}


@pytest.mark.parametrize("reference", ["hydra", "harp"])
@pytest.mark.parametrize("name", sorted(STAGES))
def test_pruned_reference_checkpoint_loads_into_every_stage(tmp_path, capsys, reference, name):
    pair = f"{reference}/resnet18"
    ckpt = reference_checkpoint(pair, pruned=True)
    path = tmp_path / "model_best.pth.tar"
    torch.save(ckpt, path)
    cls, kwargs = STAGES[name]
    module = stage(cls, path, **kwargs)
    module.setup("fit")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    state = ckpt["state_dict"]
    weights = dict(module.model.named_parameters())
    assert line.startswith(f"init_from {str(path)!r}: reference checkpoint ('state_dict' entry); loaded 122")
    assert "top-level arch, best_prec1, epoch, optimizer" in line
    if name == "finetune":
        # The mask HYDRA/HARP evaluate: top |popup_scores| per layer, k per layer (HARP: from k_score).
        assert "mask: top |popup_scores| per layer" in line and "popup_scores of" not in line
        for layer, mask in module.masks.items():
            scores = state[layer.replace(".weight", ".popup_scores")]
            n = scores.numel()
            if reference == "harp":
                k_min = 0.1 * 0.1
                keep = torch.sigmoid(state[layer.replace(".weight", ".k_score")]) * (1 - k_min) + k_min
                kept = n - int((1 - keep) * n)
            else:
                kept = n - int((1 - 0.1) * n)
            assert int(mask.sum()) == kept, layer
            threshold = scores.abs().flatten().sort().values[n - kept]
            assert bool((mask.flatten() == (scores.abs().flatten() >= threshold).float()).all()), layer
            assert torch.equal(weights[layer].detach(), state[layer] * mask)
    else:
        # Dense weights in; the scores (and HARP's rates) said to be ignored.
        assert torch.equal(weights["conv1.weight"].detach(), state["conv1.weight"])
        assert "popup_scores of 21 layers" in line
        assert ("k_score of 21 layers" in line) == (reference == "harp")
    if name == "search":
        assert "scores start from the loaded weights" in line


@pytest.mark.parametrize("wrapper", ["state_dict", "net"])
@pytest.mark.parametrize("name", sorted(STAGES))
def test_dense_reference_checkpoint_loads_into_every_stage(tmp_path, capsys, wrapper, name):
    ckpt = reference_checkpoint("benchmark/vgg16_bn", pruned=False, wrapper=wrapper)
    state = ckpt[wrapper]
    state["features.0.weight"][:, :, 0] = 0.0  # pruned entries of a `*_dense.pth.tar`: exact zeros
    ckpt[wrapper] = {f"module.{k}": v for k, v in state.items()}  # saved from DataParallel
    path = tmp_path / "dense.pt"
    torch.save(ckpt, path)
    cls, kwargs = STAGES[name]
    module = stage(cls, path, arch="vgg16_bn", **{k: v for k, v in kwargs.items() if k != "reference_k"})
    module.setup("fit")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"reference checkpoint ({wrapper!r} entry); loaded 84 model entries" in line
    assert "popup_scores" not in line
    assert torch.equal(module.model.state_dict()["features.1.running_var"], state["features.1.running_var"])
    if name == "finetune":
        assert "mask: the non-zero weights" in line
        assert float(module.masks["features.0.weight"][:, :, 0].sum()) == 0.0


@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_hydra_wrn_checkpoint_drops_its_unused_block(tmp_path, capsys, name):
    ckpt = reference_checkpoint("hydra/wrn28_4", pruned=True)
    path = tmp_path / "wrn.pth.tar"
    torch.save(ckpt, path)
    cls, kwargs = STAGES[name]
    module = stage(cls, path, arch="wrn28_4", **kwargs)
    module.setup("fit")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "loaded 155 model entries" in line
    # Its 40 entries and the scores of its 9 convolutions: nothing of the network.
    assert "58 sub_block1.* entries (HYDRA's WRN block its forward never calls)" in line
    if name == "finetune":
        assert "mask: top |popup_scores| per layer (k=0.1)" in line
        assert int(module.masks["fc.weight"].sum()) == 2560 - int(0.9 * 2560)
    else:
        assert "popup_scores of 29 layers" in line


def test_finetune_refuses_scores_without_their_k(tmp_path):
    path = tmp_path / "pruned.pth.tar"
    torch.save(reference_checkpoint("hydra/resnet18", pruned=True), path)
    module = stage(MaskedFinetuner, path)
    with pytest.raises(ValueError, match=r"reference_k"):
        module.preflight(module.trainer, "fit")


def test_channel_pruned_scores_are_refused():
    model = ours("resnet18", 10)
    state = dict(model.state_dict())
    state["conv1.popup_scores"] = torch.rand(64, 1, 1, 1)  # HARP's channel pruning
    with pytest.raises(CheckpointError, match="channel pruning"):
        reference_masks(read_init_source({"state_dict": state}, model), 0.1)


# ---------------------------------------------------------------- export: layout and normalisation
def finetune_checkpoint(tmp_path, arch="resnet18", mean=None, std=None):
    model = ours(arch, 10)
    masks = {n: (torch.rand_like(p) > 0.9) for n, p in model.named_parameters() if p.dim() > 1}
    path = tmp_path / f"{arch}.ckpt"
    torch.save(
        {
            "hyper_parameters": {
                "model": arch,
                "num_classes": 10,
                "in_channels": 3,
                "mean": mean,
                "std": std,
            },
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "masks": masks,
        },
        path,
    )
    return path, masks


@pytest.mark.parametrize("pair", ["benchmark/vgg16_bn", "hydra/wrn28_4", "harp/wrn28_4"])
def test_export_for_a_reference_writes_its_loader_layout(tmp_path, pair):
    reference, arch = pair.split("/")
    path, masks = finetune_checkpoint(tmp_path, arch)
    export(path, tmp_path / "out.pt", reference=reference)
    written = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(written) == {"state_dict"}  # what the references' loaders read: ckpt["state_dict"]
    state = written["state_dict"]
    assert shapes_of(state) == dict((k, s) for k, s in REFERENCE["models"][pair]["keys"])
    name = "features.0.weight" if arch == "vgg16_bn" else "block2.layer.0.conv1.weight"
    assert torch.equal(state[name] != 0, masks[name] & (state[name] != 0)) and bool((state[name] != 0).any())


def test_export_refuses_a_reference_without_that_architecture(tmp_path):
    path, _ = finetune_checkpoint(tmp_path, "wrn28_4")
    with pytest.raises(ValueError, match="benchmark has no class for model 'wrn28_4'"):
        export(path, tmp_path / "out.pt", reference="benchmark")
    assert not (tmp_path / "out.pt").exists()


def test_normalisation_never_leaves_silently(tmp_path):
    mean, std = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]
    path, _ = finetune_checkpoint(tmp_path, "resnet18", mean, std)
    with pytest.raises(CheckpointError, match=r"normalises its inputs inside.*normalized_inputs"):
        export(path, tmp_path / "out.pt", reference="benchmark")
    assert not (tmp_path / "out.pt").exists()
    with pytest.warns(UserWarning, match=r"only on inputs normalised with mean=\[0.4914"):
        report = export(path, tmp_path / "out.pt", reference="benchmark", normalized_inputs=True)
    assert "WARNING: model 'resnet18' normalises its inputs inside" in report
    # What the warning promises: the plain class fed normalised inputs gives the trained logits.
    trained = build_model("resnet18", 10, 3, mean, std).eval()
    plain = build_model("resnet18", 10, 3).eval()
    state = torch.load(tmp_path / "out.pt", weights_only=True)["state_dict"]
    trained.load_state_dict(state)
    plain.load_state_dict(state)
    x = torch.rand(2, 3, 32, 32)
    normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(trained(x), plain(normalised), atol=1e-5)


def test_plain_export_of_an_unnormalised_model_is_unchanged(tmp_path):
    path, _ = finetune_checkpoint(tmp_path, "vgg16_bn")
    report = export(path, tmp_path / "out.pt")
    assert "WARNING" not in report
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    build_model("vgg16_bn", 10, 3).load_state_dict(state, strict=True)


# ---------------------------------------------------------------- the real classes, when available
def test_against_the_real_classes():
    root = os.environ.get("S2AP_REFERENCE_REPOS")
    if not root:
        pytest.skip(
            "S2AP_REFERENCE_REPOS is not set: the strict-load and equal-logit check against the real "
            "HYDRA/HARP/benchmark classes needs their checkouts (see make_reference_keys.py)"
        )
    spec = importlib.util.spec_from_file_location("make_reference_keys", DATA / "make_reference_keys.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    roots = {"hydra": "hydra", "harp": "harp", "benchmark": "AdversarialPruningBenchmark"}
    for pair in PAIRS:
        reference, arch = pair.split("/")
        checkout = Path(root) / roots[reference]
        diffs = script.check_pair(checkout, reference, arch)
        assert max(diffs.values()) <= 1e-9, pair
        built = script.build(checkout, reference, arch).state_dict()
        assert shapes_of(built) == dict((k, s) for k, s in REFERENCE["models"][pair]["keys"]), pair
