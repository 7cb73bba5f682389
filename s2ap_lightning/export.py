"""Export a pruned model as a plain state dict with exact zeros."""

from __future__ import annotations

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


def export(checkpoint_path: str | Path, out_path: str | Path) -> str:
    """Write the pruned plain state dict; return the sparsity report."""
    checkpoint = load_file(checkpoint_path)
    model, state = pruned_state_dict(checkpoint)
    atomic_torch_save(state, out_path)
    return format_sparsity(*sparsity_table(model))
