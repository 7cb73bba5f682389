"""The stages' typed option blocks as hyper-parameters, and the flat options of older checkpoints.

Until the typed blocks, a stage took the threat model, the evaluation and the base method as flat
options (``eps``, ``eval_pgd_steps``, ``aa_seed``, ``base_method``, ``rate_bound``, ...), renamed on the
way into the evaluation. Checkpoints written then still load: :func:`upgrade_hparams` maps those
keys into the blocks, both when a checkpoint is restored through ``s2ap`` and when a stage is built
from one in Python (``load_from_checkpoint``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from s2ap_lightning.pruning.methods import LEGACY_KEYS as LEGACY_METHOD_KEYS
from s2ap_lightning.pruning.methods import method_from_legacy

#: Flat option -> (block, field) of the blocks that replaced them.
LEGACY_KEYS: dict[str, tuple[str, str]] = {
    "eps": ("threat", "eps"),
    "step_size": ("threat", "step_size"),
    "attack_steps": ("threat", "steps"),
    "norm": ("threat", "norm"),
    "eval_pgd_steps": ("evaluation", "pgd_steps"),
    "eval_pgd_restarts": ("evaluation", "pgd_restarts"),
    "aa_images": ("evaluation", "aa_images"),
    "aa_version": ("evaluation", "aa_version"),
    "aa_batch_size": ("evaluation", "aa_batch_size"),
    "aa_seed": ("evaluation", "seed"),
}

#: Flat options that have no successor: the checks' fixed tolerance became a statistical test.
RETIRED_KEYS = ("check_tolerance",)

Block = TypeVar("Block")


def as_block(cls: type[Block], value: Block | Mapping[str, Any]) -> Block:
    """``value`` as a ``cls`` instance: jsonargparse gives instances, a checkpoint's hparams dicts."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls(**value)
    raise TypeError(f"expected a {cls.__name__} or a mapping of its fields, got {value!r}")


def upgrade_hparams(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The blocks the flat options of an older checkpoint mean: ``{"threat": {...}, ...}``.

    Only blocks that some flat option fills are returned; keys that are not flat options of an
    older version are ignored when ``flat`` is a checkpoint's whole hparams (see
    :func:`split_legacy`), so a current checkpoint comes back unchanged.
    """
    blocks: dict[str, Any] = {}
    for key, value in flat.items():
        if key in LEGACY_KEYS:
            block, field = LEGACY_KEYS[key]
            existing = flat.get(block)
            if isinstance(existing, Mapping):  # a current checkpoint: its block wins
                continue
            blocks.setdefault(block, {})[field] = value
    if any(k in flat for k in LEGACY_METHOD_KEYS) and not isinstance(flat.get("method"), (Mapping, str)):
        blocks["method"] = method_from_legacy(flat).config()
    return blocks


def split_legacy(kwargs: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The blocks of a stage's flat keyword arguments, refusing any that no version ever had."""
    known = set(LEGACY_KEYS) | set(LEGACY_METHOD_KEYS) | set(RETIRED_KEYS)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{stage}: unknown option(s) {', '.join(unknown)}")
    return upgrade_hparams(kwargs)


def upgrade_checkpoint_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's whole hparams with flat options replaced by their blocks (for the CLI)."""
    blocks = upgrade_hparams(hparams)
    legacy = set(LEGACY_KEYS) | set(LEGACY_METHOD_KEYS) | set(RETIRED_KEYS)
    out = {k: v for k, v in hparams.items() if k not in legacy}
    return {**out, **blocks}


def plain_value(value: Any) -> Any:
    """A hyper-parameter as a checkpoint stores it: blocks and parsed namespaces as plain dicts.

    Lets a command's parsed options be compared with a checkpoint's saved ones (the resume check).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        return plain_value(value.as_dict())
    if hasattr(value, "config") and callable(value.config):  # a base method
        return value.config()
    if isinstance(value, Mapping):
        return {k: plain_value(v) for k, v in value.items()}
    return value
