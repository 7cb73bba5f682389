"""Stage 3: adversarial finetuning of the kept weights with the mask fixed."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from s2ap_lightning.checkpoint import stored_masks
from s2ap_lightning.pruning.scores import prunable_weight_names
from s2ap_lightning.stages.pretrain import RobustPretrainer


class MaskSet(nn.Module):
    """Fixed binary masks as buffers, so they travel in every checkpoint of this stage."""

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


class MaskedFinetuner(RobustPretrainer):
    """Finetunes ``w * M`` with ``M`` taken from ``init_from``.

    ``init_from`` is a mask-search checkpoint (its stored masks are used) or a pruned plain state dict
    (the mask is where the weights are non-zero). Pruned weights are exactly zero after every
    optimiser step: their gradients are masked before the step (so momentum and weight decay never
    move them) and the mask is re-applied after it.

    Args:
        lr: finetuning learning rate (paper: 0.01).
        **kwargs: see :class:`~s2ap_lightning.stages.base.RobustTask`.

    """

    def __init__(self, lr: float = 0.01, **kwargs: Any) -> None:
        super().__init__(lr=lr, **kwargs)

    def configure_models(self) -> None:
        super().configure_models()
        self.masks = MaskSet(self.model)

    def on_init_from(self, checkpoint: Any) -> None:
        masks = stored_masks(checkpoint)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, buf in self.masks.items():
                if masks is not None:
                    buf.copy_(masks[name])
                else:
                    buf.copy_((params[name] != 0).to(buf.dtype))
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        params = dict(self.model.named_parameters())
        for name, mask in self.masks.items():
            params[name].mul_(mask)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        params = dict(self.model.named_parameters())
        for name, mask in self.masks.items():
            if params[name].grad is not None:
                params[name].grad.mul_(mask)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.apply_masks()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["masks"] = {n: m.bool() for n, m in self.masks.items()}
