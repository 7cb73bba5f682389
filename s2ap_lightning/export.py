"""Export a pruned model as a plain state dict with exact zeros, for us or for a reference's class.

The paper's reference codes (HYDRA, HARP, the adversarial pruning benchmark) build the same
``resnet18``, ``vgg16_bn``, ``wrn28_4`` and ``resnet50`` as :mod:`s2ap_lightning.models` and read a
checkpoint as ``torch.load(f)["state_dict"]``. ``reference=`` writes that layout (plus HYDRA's unused
``sub_block1`` for the WRN), so the file loads with ``strict=True`` into their classes.

Input normalisation is the one thing a state dict cannot carry: our models normalise inside
(non-persistent buffers), the reference classes take inputs as their data pipeline gives them (the
benchmark: raw [0, 1]). Folding the statistics into the first convolution is not exact (it zero-pads
the *normalised* image, so border pixels would change), so an export of a normalising model is
refused unless ``normalized_inputs=True`` says the weights go to a loader that normalises itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from s2ap_lightning.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    load_file,
    model_state_dict,
    stored_masks,
)
from s2ap_lightning.models import build_model
from s2ap_lightning.pruning.scores import prunable_state_weights, prunable_weight_names


def model_from_checkpoint(checkpoint: dict) -> nn.Module:
    """Build the plain architecture a stage checkpoint was trained with."""
    hp = checkpoint.get("hyper_parameters") or {}
    try:
        return build_model(
            hp["model"],
            hp["num_classes"],
            hp["in_channels"],
            hp.get("mean"),
            hp.get("std"),
            hp.get("image_size", 32),
        )

    except KeyError as err:
        raise CheckpointError(f"checkpoint has no hyper-parameter {err} to rebuild the model") from err


def pruned_state_dict(checkpoint: dict) -> tuple[nn.Module, dict[str, Tensor]]:
    """Plain model and its state dict ``w * M`` from a mask-search or finetuning checkpoint."""
    model = model_from_checkpoint(checkpoint)
    state = model_state_dict(checkpoint)
    masks = stored_masks(checkpoint)
    if masks is None:
        raise CheckpointError("checkpoint stores no masks: export a mask-search or finetuning run")
    state = dict(state)
    for name in prunable_weight_names(model):
        state[name] = state[name] * masks[name].to(state[name].dtype)
    model.load_state_dict(state, strict=True)
    return model, model.state_dict()


def plain_model(checkpoint: dict) -> nn.Module:
    """The network a stage checkpoint evaluates: ``w * M`` for mask search and finetuning, else dense."""
    if stored_masks(checkpoint) is not None:
        return pruned_state_dict(checkpoint)[0]
    model = model_from_checkpoint(checkpoint)
    model.load_state_dict(model_state_dict(checkpoint), strict=True)
    return model


def sparsity_table(
    model_or_state: nn.Module | Mapping[str, Tensor],
) -> tuple[list[tuple[str, int, int, float]], float]:
    """Per prunable layer ``(name, kept, total, sparsity)`` and the global sparsity.

    Takes the model, or a plain state dict (an exported file) whose prunable weights are found by shape.
    """
    if isinstance(model_or_state, nn.Module):
        params = dict(model_or_state.named_parameters())
        weights = {n: params[n] for n in prunable_weight_names(model_or_state)}
    else:
        weights = prunable_state_weights(model_or_state)
    rows = []
    for name, w in weights.items():
        kept = int((w != 0).sum())
        rows.append((name, kept, w.numel(), 1.0 - kept / w.numel()))
    total = sum(r[2] for r in rows)
    return rows, 1.0 - sum(r[1] for r in rows) / total


def format_sparsity(rows: list[tuple[str, int, int, float]], global_sparsity: float) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'layer':<{width}}  {'kept':>9}  {'total':>9}  sparsity"]
    lines += [f"{n:<{width}}  {k:>9}  {t:>9}  {s:8.4f}" for n, k, t, s in rows]
    lines.append(f"{'global':<{width}}  {'':>9}  {'':>9}  {global_sparsity:8.4f}")
    return "\n".join(lines)


#: The reference codes whose classes an export can target, and the architectures each has.
REFERENCE_MODELS = {
    "hydra": ("resnet18", "vgg16_bn", "wrn28_4", "resnet50"),
    "harp": ("resnet18", "vgg16_bn", "wrn28_4", "resnet50"),
    "benchmark": ("resnet18", "vgg16_bn"),
}


def reference_state_dict(state: Mapping[str, Tensor], model_name: str, reference: str) -> dict[str, Tensor]:
    """Our plain state dict in the key layout of ``reference``'s class of the same architecture.

    The keys are the same for every pair but one: HYDRA's WRN also holds ``sub_block1``, a block its
    forward never calls. It is filled with a copy of ``block1`` (same shapes): the logits do not
    depend on it, and a sparsity counted over the whole file stays that of the network.
    """
    if reference not in REFERENCE_MODELS:
        raise ValueError(f"reference={reference!r} is unknown; valid: {', '.join(REFERENCE_MODELS)}")
    if model_name not in REFERENCE_MODELS[reference]:
        raise ValueError(
            f"{reference} has no class for model {model_name!r} "
            f"(it has {', '.join(REFERENCE_MODELS[reference])})"
        )
    out = dict(state)
    if reference == "hydra" and model_name == "wrn28_4":
        out.update({"sub_block1." + k[7:]: v.clone() for k, v in state.items() if k.startswith("block1.")})
    return out


def check_normalization(model: nn.Module, name: str, normalized_inputs: bool) -> str | None:
    """Refuse (or, when told the loader normalises, warn about) a model that normalises inside.

    Returns the warning given, if any, so that the export report repeats it.
    """
    norm = getattr(model, "normalize", None)
    if norm is None or not getattr(norm, "enabled", False):
        return None
    mean, std = norm.mean.flatten().tolist(), norm.std.flatten().tolist()
    stats = f"mean={[round(v, 6) for v in mean]}, std={[round(v, 6) for v in std]}"
    text = (
        f"model {name!r} normalises its inputs inside ({stats}); the state dict cannot hold "
        "this, and the reference classes (HYDRA, HARP without --normalize, the adversarial pruning "
        "benchmark) apply the weights to their inputs as given (the benchmark: raw [0, 1] images). "
        "No exact fold into the weights exists (the first convolution zero-pads the normalised image)"
    )
    if not normalized_inputs:
        raise CheckpointError(
            f"{text}. Pass normalized_inputs=True (s2ap export --normalized_inputs true) to write the "
            "weights for a loader that normalises with these values itself (HARP's normalize=True, "
            "HYDRA's ImageNet data pipeline), or train without mean/std"
        )
    message = f"{text}: the exported weights give the trained logits only on inputs normalised with {stats}"
    warnings.warn(message, stacklevel=2)
    return message


def export(
    checkpoint_path: str | Path,
    out_path: str | Path,
    reference: str | None = None,
    normalized_inputs: bool = False,
) -> str:
    """Write the pruned plain state dict (or ``{"state_dict": ...}`` for a reference); return a report.

    Args:
        checkpoint_path: mask-search or finetuning checkpoint.
        out_path: file to write.
        reference: ``hydra``, ``harp`` or ``benchmark``: write the layout that reference's loader
            reads (its class loads it with ``strict=True``); None writes our plain state dict.
        normalized_inputs: write a model that normalises its inputs inside anyway (a warning says
            with which statistics the loader must normalise); refused otherwise.

    """
    checkpoint = load_file(checkpoint_path)
    name = str((checkpoint.get("hyper_parameters") or {}).get("model"))
    model, state = pruned_state_dict(checkpoint)
    warned = check_normalization(model, name, normalized_inputs)
    if reference is not None:
        atomic_torch_save({"state_dict": reference_state_dict(state, name, reference)}, out_path)
    else:
        atomic_torch_save(state, out_path)
    report = format_sparsity(*sparsity_table(model))
    return report if warned is None else f"{report}\nWARNING: {warned}"
