"""Write ``reference_keys.json``: the state-dict keys and shapes of the paper's reference models.

The tests compare our architectures with these lists, so that no reference code needs to be in the
project or installed. Run with checkouts of the three reference repositories (no installation: each
model file is imported by path, with ``nn.Conv2d``/``nn.Linear`` as its layers, or HYDRA's and HARP's
own ``SubnetConv``/``SubnetLinear`` for the layout of their pruned checkpoints)::

    for r in inspire-group/hydra intellisec/harp pralab/AdversarialPruningBenchmark; do
      git clone https://github.com/$r /tmp/ref/${r#*/}
    done
    python tests/data/reference_models/make_reference_keys.py \\
        --hydra /tmp/ref/hydra --harp /tmp/ref/harp --benchmark /tmp/ref/AdversarialPruningBenchmark

A checkout may also be a ``git archive`` export; then pass its commit with ``--hydra-commit`` etc.
Besides writing the lists, the script checks both directions of the weight transfer against the real
classes (``--check``, on by default): our exported state dict loads with ``strict=True`` into each
reference class and gives the same logits (float64, eval mode, BatchNorm statistics randomised), and
the reference's state dict loads through our ``init_from`` reader into our model with the same logits.
``tests/test_reference_models.py`` runs the same check when ``S2AP_REFERENCE_REPOS`` names a folder
holding ``hydra``, ``harp`` and ``AdversarialPruningBenchmark`` checkouts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
OUT = HERE / "reference_keys.json"
REPOS = {
    "hydra": "inspire-group/hydra",
    "harp": "intellisec/harp",
    "benchmark": "pralab/AdversarialPruningBenchmark",
}
CIFAR_MEAN, CIFAR_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # HARP's classes want them; normalize=False

#: (reference, our model name) -> (model file, builder, keyword arguments besides the layers, classes)
MODELS: dict[tuple[str, str], tuple[str, str, dict[str, Any], int]] = {
    ("hydra", "resnet18"): ("models/resnet_cifar.py", "resnet18", {}, 10),
    ("hydra", "vgg16_bn"): ("models/vgg_cifar.py", "vgg16_bn", {}, 10),
    ("hydra", "wrn28_4"): ("models/wrn_cifar.py", "wrn_28_4", {}, 10),
    ("hydra", "resnet50"): ("models/resnet.py", "ResNet50", {}, 1000),
    ("harp", "resnet18"): ("models/resnet_cifar.py", "resnet18", {"mean": CIFAR_MEAN, "std": CIFAR_STD}, 10),
    (
        "harp",
        "vgg16_bn",
    ): ("models/vgg_cifar.py", "vgg16_bn", {"mean": CIFAR_MEAN, "std": CIFAR_STD, "normalize": False}, 10),
    ("harp", "wrn28_4"): ("models/wrn_cifar.py", "wrn_28_4", {"mean": CIFAR_MEAN, "std": CIFAR_STD}, 10),
    ("harp", "resnet50"): ("models/resnet.py", "ResNet50", {"mean": CIFAR_MEAN, "std": CIFAR_STD}, 1000),
    # The benchmark's builders take no arguments: plain nn.Conv2d / nn.Linear are built in.
    ("benchmark", "resnet18"): ("models/base_resnet18.py", "resnet18", {}, 10),
    ("benchmark", "vgg16_bn"): ("models/base_vgg16.py", "vgg16_bn", {}, 10),
}


class PlainConv(nn.Conv2d):
    """``nn.Conv2d`` that accepts HARP's extra layer arguments (its state dict is nn.Conv2d's)."""

    def __init__(self, *args: Any, prune_reg: str = "weight", task_mode: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


class PlainLinear(nn.Linear):
    """``nn.Linear`` that accepts HARP's extra layer arguments."""

    def __init__(self, *args: Any, prune_reg: str = "weight", task_mode: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


def load_module(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def subnet_layers(root: Path, reference: str) -> tuple[type, type]:
    """The reference's own pruned layers (``models/layers.py``), for its pruned checkpoint layout."""
    if reference == "harp":
        # HARP's layers import `from utils.utils import rate_act_func`.
        sys.modules.setdefault("utils", types.ModuleType("utils"))
        load_module(root / "utils" / "utils.py", "utils.utils")
    layers = load_module(root / "models" / "layers.py", f"_ref_{reference}_layers")
    return layers.SubnetConv, layers.SubnetLinear


def build(root: Path, reference: str, arch: str, pruned: bool = False) -> nn.Module:
    path, builder, kwargs, classes = MODELS[(reference, arch)]
    module = load_module(root / path, f"_ref_{reference}_{Path(path).stem}")
    torch.manual_seed(0)
    if reference == "benchmark":
        return getattr(module, builder)()
    conv, linear = subnet_layers(root, reference) if pruned else (PlainConv, PlainLinear)
    extra = {"num_classes": classes} if arch == "resnet50" else {}
    return getattr(module, builder)(conv, linear, "kaiming_normal", **kwargs, **extra)


def commit_of(root: Path, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        raise SystemExit(f"{root} is not a git checkout: pass its commit (--<reference>-commit)") from err


def shapes(state: dict[str, torch.Tensor]) -> list[list[Any]]:
    return [[k, list(v.shape)] for k, v in state.items()]


def randomise(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that a swapped layer would show."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def check_pair(root: Path, reference: str, arch: str) -> dict[str, float]:
    """Both directions against the real class: strict loads and equal logits (float64, eval mode)."""
    from s2ap_lightning.checkpoint import read_init_source
    from s2ap_lightning.export import reference_state_dict
    from s2ap_lightning.models import build_model

    classes = MODELS[(reference, arch)][3]
    size = 64 if arch == "resnet50" else 32
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.manual_seed(3)
    ours = randomise(build_model(arch, classes, 3)).double().eval()
    # Our ResNet-50 normalises inside (ImageNet statistics); HYDRA's data pipeline (and HARP's
    # --normalize) does it before the model: the references see the normalised images.
    x_ref = ours.normalize(x) if ours.normalize.enabled else x
    theirs = build(root, reference, arch).double().eval()
    theirs.load_state_dict(reference_state_dict(ours.state_dict(), arch, reference), strict=True)
    with torch.no_grad():
        forward = float((ours(x) - theirs(x_ref)).abs().max())
    theirs = randomise(build(root, reference, arch)).double().eval()
    back = build_model(arch, classes, 3).double().eval()
    source = read_init_source({"state_dict": theirs.state_dict(), "epoch": 0}, back)
    back.load_state_dict(source.weights, strict=True)
    with torch.no_grad():
        backward = float((back(x) - theirs(x_ref)).abs().max())
    if max(forward, backward) > 1e-9:
        raise AssertionError(f"{reference} {arch}: logits differ by {forward:g} / {backward:g}")
    return {"ours_into_theirs": forward, "theirs_into_ours": backward}


def compact(text: str) -> str:
    """One ``["key", [shape]]`` pair per line: a readable diff when a reference changes."""
    text = re.sub(
        r"\[\s*((?:-?\d+,\s*)*-?\d+)?\s*\]",
        lambda m: "[" + ", ".join((m.group(1) or "").replace(",", " ").split()) + "]",
        text,
    )
    return re.sub(r'\[\s*("[^"]*"),\s*(\[[^\]]*\])\s*\]', r"[\1, \2]", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in REPOS:
        parser.add_argument(f"--{name}", type=Path, required=True, help=f"checkout of {REPOS[name]}")
        parser.add_argument(f"--{name}-commit", default=None, help="its commit, for an exported tree")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    roots = {name: getattr(args, name) for name in REPOS}
    out: dict[str, Any] = {
        "generated_by": "tests/data/reference_models/make_reference_keys.py",
        "sources": {
            name: {
                "repository": REPOS[name],
                "commit": commit_of(roots[name], getattr(args, f"{name}_commit")),
            }
            for name in REPOS
        },
        "models": {},
    }
    for (reference, arch), (path, builder, _, classes) in MODELS.items():
        dense = build(roots[reference], reference, arch).state_dict()
        entry: dict[str, Any] = {
            "reference": reference,
            "file": path,
            "builder": builder,
            "num_classes": classes,
            "parameters": sum(
                v.numel() for k, v in dense.items() if "running" not in k and "num_batches" not in k
            ),
            "keys": shapes(dense),
        }
        if reference != "benchmark":
            # The pruned layout: what HYDRA's and HARP's prune/finetune checkpoints hold beyond `keys`.
            pruned = build(roots[reference], reference, arch, pruned=True).state_dict()
            entry["pruned_extra_keys"] = shapes({k: v for k, v in pruned.items() if k not in dense})
            missing = sorted(set(dense) - set(pruned))
            assert not missing, f"{reference} {arch}: pruned layout lacks {missing[:3]}"
        if args.check:
            entry["checked_logit_max_abs_diff"] = check_pair(roots[reference], reference, arch)
        out["models"][f"{reference}/{arch}"] = entry
        print(f"{reference}/{arch}: {len(entry['keys'])} keys, {entry['parameters']:,} parameters")
    args.out.write_text(compact(json.dumps(out, indent=1)) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
