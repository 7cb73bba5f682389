"""Masks once searched: held as buffers while finetuning, and stored as packed files.

A fixed mask travels in every finetuning checkpoint (:class:`MaskSet`) and per-epoch masks of a
search are kept as 1-bit-per-weight files (:func:`pack_masks`), loadable with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from s2ap_lightning.checkpoint import load_file, stored_masks
from s2ap_lightning.pruning.scores import prunable_state_weights, prunable_weight_names

#: The ``format`` tag of a packed-mask file.
PACKED_FORMAT = "s2ap-packed-masks"


class MaskSet(nn.Module):
    """Fixed binary masks as buffers, so they travel in every checkpoint of the finetuning stage."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = prunable_weight_names(model)
        params = dict(model.named_parameters())
        for name in self.names:
            self.register_buffer(name.replace(".", "__"), torch.ones_like(params[name]))

    def __getitem__(self, name: str) -> Tensor:
        return getattr(self, name.replace(".", "__"))

    def items(self) -> list[tuple[str, Tensor]]:
        return [(n, self[n]) for n in self.names]


def pack_masks(masks: Mapping[str, Tensor]) -> dict[str, Any]:
    """Bit-packed masks (1 bit per weight) with their shapes, loadable with ``weights_only=True``."""
    return {
        name: {
            "shape": list(m.shape),
            "bits": torch.from_numpy(np.packbits(m.detach().bool().cpu().flatten().numpy())),
        }
        for name, m in masks.items()
    }


def unpack_masks(packed: Mapping[str, Any]) -> dict[str, Tensor]:
    out = {}
    for name, entry in packed.items():
        shape = entry["shape"]
        numel = int(np.prod(shape)) if shape else 1
        bits = np.unpackbits(entry["bits"].numpy())[:numel]
        out[name] = torch.from_numpy(bits.astype(np.float32)).view(shape)
    return out


def load_masks(path: str | Path) -> dict[str, Tensor]:
    """Masks from a packed-mask file, a stage checkpoint or an exported pruned state dict."""
    obj = load_file(path)
    if isinstance(obj, dict) and obj.get("format") == PACKED_FORMAT:
        return unpack_masks(obj["masks"])
    masks = stored_masks(obj)
    if masks is not None:
        return masks
    # An exported plain state dict: the mask is where the prunable weights are non-zero.
    return {k: (v != 0).float() for k, v in prunable_state_weights(obj).items()}
