"""Safe checkpoint loading and the ``init_from`` hand-off between stages.

Every file is loaded with ``weights_only=True``: a checkpoint from someone else must never run code.

``init_from`` takes three kinds of file: a Lightning checkpoint of a stage, a plain state dict (an
export), and a checkpoint of the paper's reference codes, which they save as
``{"state_dict": ..., "epoch", "arch", "optimizer", ...}`` (the benchmark also ``{"net": ...}``).
Their dense checkpoints hold our keys. Their pruned ones hold, beside each convolution's and linear
layer's ``weight`` (dense: pruned entries keep their pretrained values), HYDRA's ``popup_scores``
(one score per weight; the mask keeps the top ``k`` of ``|popup_scores|`` in every layer) and, in
HARP's, ``k_score`` (a scalar per layer: keep rate ``sigmoid(k_score) * (1 - k * alpha) + k * alpha``).
HYDRA's WRN also holds ``sub_block1``, a block its forward never calls. Every stage loads the dense
weights; what it does with the rest, and what it ignored, is said in one line
(:func:`init_from_summary`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded, or does not fit the model."""


def load_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if path.is_dir():
        held = sorted(p.name for p in path.iterdir())
        shown = ", ".join(held[:8]) + (f", ... ({len(held)} entries)" if len(held) > 8 else "")
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a directory, not a file; it holds: {shown or 'nothing'}. "
            "Pass a checkpoint file inside it (e.g. best.ckpt)"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err) and "GLOBAL" not in str(err):
            raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupted ({err})") from err
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be loaded with weights_only=True: it needs "
            f"arbitrary code to unpickle, which this project refuses ({err})"
        ) from err
    except Exception as err:
        # Damaged bytes reach the legacy unpickler, which fails in whatever way the garbage leads it:
        # besides the errors above, IndexError, KeyError and UnicodeDecodeError (seen on random bytes).
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupted ({type(err).__name__}: {err})"
        ) from err


def is_lightning_checkpoint(obj: Any, prefix: str = "model.") -> bool:
    """A checkpoint Lightning wrote (a stage's), as opposed to a reference code's ``{"state_dict": ...}``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        return False
    return "pytorch-lightning_version" in obj or any(k.startswith(prefix) for k in obj["state_dict"])


def _plain(state: dict[str, Any]) -> dict[str, Tensor] | None:
    """``state`` without wrapper prefixes, if it is a flat dict of tensors."""
    if not state or not all(isinstance(v, Tensor) for v in state.values()):
        return None
    # DataParallel/DDP wrappers add `module.`; HARP's ImageNet start (Free-AT) also `basic_model.`.
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if all(k.startswith("basic_model.") for k in state):
        state = {k.removeprefix("basic_model."): v for k, v in state.items()}
    return state


def reference_wrapper_key(obj: Any) -> str | None:
    """The entry of a reference code's checkpoint that holds the weights (``state_dict``/``net``)."""
    if isinstance(obj, dict) and not is_lightning_checkpoint(obj):
        for key in ("state_dict", "net"):
            if isinstance(obj.get(key), dict) and _plain(obj[key]) is not None:
                return key
    return None


def model_state_dict(obj: Any, prefix: str = "model.") -> dict[str, Tensor]:
    """Every model entry of a stage's Lightning checkpoint, a reference checkpoint or a state dict.

    A reference's pruned checkpoint keeps its ``popup_scores``/``k_score`` entries here;
    :func:`read_init_source` separates them from the weights.
    """
    if is_lightning_checkpoint(obj, prefix):
        state = obj["state_dict"]
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    wrapper = reference_wrapper_key(obj)
    plain = _plain(obj[wrapper]) if wrapper else _plain(obj) if isinstance(obj, dict) else None
    if plain is None:
        raise CheckpointError(
            "file is neither a Lightning checkpoint, a plain state dict, nor a reference code's "
            "checkpoint ({'state_dict': ...} or {'net': ...})"
        )
    return plain


#: Entries of the reference codes' pruned layers, beside ``weight``: HYDRA's and HARP's scores, and
#: HARP's per-layer rate.
SCORE_SUFFIX, RATE_SUFFIX = ".popup_scores", ".k_score"
#: HYDRA's WRN block that its forward never calls (HARP drops it too).
UNUSED_BLOCK = "sub_block1."


@dataclass
class InitSource:
    """An ``init_from`` file taken apart: what loads into the model, and what is kept beside it.

    Args:
        kind: what the file is, in words.
        weights: the entries the model loads (``load_state_dict(strict=True)``).
        scores: a reference's ``popup_scores``, by the name of the weight they score.
        rates: HARP's ``k_score``, by weight name.
        ignored: what the file held that the model does not load, in words.

    """

    kind: str
    weights: dict[str, Tensor]
    scores: dict[str, Tensor] = field(default_factory=dict)
    rates: dict[str, Tensor] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def read_init_source(obj: Any, model: nn.Module) -> InitSource:
    """Separate a loaded file's weights for ``model`` from the reference codes' pruning entries."""
    state = model_state_dict(obj)
    own = model.state_dict()
    if is_lightning_checkpoint(obj):
        kind = f"Lightning checkpoint (epoch {obj.get('epoch', '?')})"
        # A finetuning checkpoint's mask buffers are reported with its stored masks (below).
        prefixes = {k.split(".", 1)[0] for k in obj["state_dict"] if not k.startswith("model.")}
        skipped = sorted(prefixes - {"masks"})
        extra = [k for k in ("optimizer_states", "lr_schedulers") if obj.get(k)]
        return InitSource(kind, state, ignored=[f"{name}.*" for name in skipped] + extra)
    wrapper = reference_wrapper_key(obj)
    kind = f"reference checkpoint ({wrapper!r} entry)" if wrapper else "plain state dict"
    source = InitSource(kind, {})
    unused = 0
    has_block = any(k.startswith(UNUSED_BLOCK) for k in own)
    for key, value in state.items():
        if key.startswith(UNUSED_BLOCK) and not has_block:
            unused += 1  # its scores too: they score no weight of the network
        elif key.endswith(SCORE_SUFFIX):
            source.scores[key.removesuffix(SCORE_SUFFIX) + ".weight"] = value
        elif key.endswith(RATE_SUFFIX):
            source.rates[key.removesuffix(RATE_SUFFIX) + ".weight"] = value
        else:
            source.weights[key] = value
    if unused:
        source.ignored.append(f"{unused} sub_block1.* entries (HYDRA's WRN block its forward never calls)")
    if wrapper and len(obj) > 1:
        source.ignored.append("top-level " + ", ".join(sorted(str(k) for k in obj if k != wrapper)))
    return source


def reference_masks(source: InitSource, k: float, alpha: float = 0.1) -> dict[str, Tensor]:
    """The masks a HYDRA or HARP pruned checkpoint evaluates, from its scores (and HARP's rates).

    Every layer keeps the top of ``|popup_scores|`` and prunes ``int((1 - k_l) * n)`` weights, as
    both codes do; ``k_l`` is the run's ``--k`` for HYDRA, and for HARP
    ``sigmoid(k_score) * (1 - k * alpha) + k * alpha`` in float32 (its ``--k`` and ``--alpha``). The
    file does not hold ``k`` or ``alpha``: the caller passes the run's values.
    """
    masks = {}
    for name, scores in source.scores.items():
        weight = source.weights.get(name)
        if weight is None or scores.shape != weight.shape:
            raise CheckpointError(
                f"{name}: popup_scores of shape {tuple(scores.shape)} beside a weight of shape "
                f"{None if weight is None else tuple(weight.shape)}; only weight pruning (one score "
                "per weight) is supported, not HARP's channel pruning"
            )
        n = scores.numel()
        if name in source.rates:
            k_min = k * alpha
            keep = torch.sigmoid(source.rates[name].float()) * (1 - k_min) + k_min
            pruned = int((1 - keep) * n)
        else:
            pruned = int((1 - k) * n)
        mask = torch.ones(n)
        mask[scores.detach().abs().flatten().argsort()[:pruned]] = 0.0
        masks[name] = mask.view_as(scores)
    return masks


def init_from_summary(path: str | Path, obj: Any, model: nn.Module, note: str | None = None) -> str:
    """One line: what ``path`` held, what the model loaded, what the stage used and what it ignored.

    Args:
        path: the ``init_from`` file.
        obj: its loaded contents.
        model: the model its weights went into.
        note: what the stage took beyond the weights (its mask, its scores), if anything; a
            reference's scores and rates count as used when the note names ``popup_scores``.

    """
    source = read_init_source(obj, model)
    ignored = list(source.ignored)
    used_scores = note is not None and "popup_scores" in note
    if source.scores and not used_scores:
        ignored.append(f"popup_scores of {len(source.scores)} layers")
    if source.rates and not used_scores:
        ignored.append(f"k_score of {len(source.rates)} layers")
    if is_lightning_checkpoint(obj) and obj.get("masks") is not None and (note is None or "mask" not in note):
        ignored.append("masks")
    parts = [f"init_from {str(path)!r}: {source.kind}", f"loaded {len(source.weights)} model entries"]
    if note:
        parts.append(note)
    parts.append(f"ignored: {', '.join(ignored) if ignored else 'nothing'}")
    return "; ".join(parts)


def report_init_from(path: str | Path, obj: Any, model: nn.Module, note: str | None = None) -> str:
    """Print :func:`init_from_summary`'s line once (global rank zero; no Trainer needed) and return it."""
    line = init_from_summary(path, obj, model, note)
    rank_zero_only(print)(line)
    return line


def stored_masks(obj: Any) -> dict[str, Tensor] | None:
    """The masks a mask-search or finetuning checkpoint stores, if any."""
    if isinstance(obj, dict) and isinstance(obj.get("masks"), dict):
        return {k: v.float() for k, v in obj["masks"].items()}
    return None


def check_compatible(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Fail with the missing, unexpected and mis-shaped keys named."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    if missing or unexpected or shapes:

        def short(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

        raise CheckpointError(
            f"{source} does not fit the model {type(model).__name__}: "
            f"missing keys [{short(missing)}], unexpected keys [{short(unexpected)}], "
            f"shape mismatches [{short(shapes)}]. Check the `model` name and num_classes."
        )


def check_loadable(model: nn.Module, path: str | Path) -> tuple[Any, dict[str, Tensor]]:
    """Load ``path`` safely and check that its weights fit ``model``; returns (object, weights).

    The weights exclude a reference checkpoint's pruning entries (:func:`read_init_source`).
    """
    obj = load_file(path)
    try:
        state = read_init_source(obj, model).weights
    except CheckpointError as err:
        raise CheckpointError(f"{str(path)!r}: {err}") from err
    check_compatible(model, state, f"init_from={str(path)!r}")
    return obj, state


def load_weights(model: nn.Module, path: str | Path) -> Any:
    """Load the plain weights of ``path`` into ``model`` strictly; returns the loaded object."""
    obj, state = check_loadable(model, path)
    model.load_state_dict(state, strict=True)
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", newline: str | None = None) -> Iterator[IO[Any]]:
    """Write to a temporary file in the same folder, then rename it over ``path``.

    A crash during the write leaves the previous file intact (rename is atomic on POSIX), and two
    processes writing the same path at once each rename a whole file: the temporary name is unique
    (a fixed ``<name>.tmp`` would let one writer rename the other's half-written file).
    ``newline`` is :func:`open`'s (``""`` for :mod:`csv`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; the result should get the permissions any file would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: object, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_file`: a crash mid-save keeps the previous checkpoint."""
    with atomic_file(path) as fh:
        torch.save(obj, fh)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a half-written checkpoint behind.

    Lightning's own writer opens the target path and writes into it; a crash (or a full disk, or a
    pre-empted job) during that write destroys the previous ``last.ckpt``. Here the checkpoint goes to
    a temporary file in the same folder, is flushed to disk, and replaces the target by rename.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_torch_save(checkpoint, path)


def require_writable(folder: str | Path, what: str, remedy: str) -> None:
    """Fail now, naming ``folder``, if ``what`` cannot be written there.

    Checked before training or evaluating, so that a read-only folder costs seconds, not the hours
    of work whose result then could not be saved. The folder is created if missing and a temporary
    file is written in it and removed: permission bits alone do not tell (root, ACLs, read-only
    mounts, quotas).

    Args:
        folder: where the command will write.
        what: what it writes there, for the message (``"checkpoints and logs"``).
        remedy: what the user can do instead, for the message.

    Raises:
        NotADirectoryError: ``folder`` (or a parent) is a file.
        PermissionError: the folder cannot be created or written.

    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder, so {what} cannot go there: {remedy}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (FileExistsError, NotADirectoryError) as err:
        raise NotADirectoryError(
            f"{folder} lies under a file, not a folder ({err.filename}), so {what} cannot go there: {remedy}"
        ) from None
    except OSError as err:  # the cause is in the message; one_line() would print the cause instead
        raise PermissionError(
            f"{what} cannot be written in {folder} ({err.strerror or err}): {remedy}"
        ) from None


def refuse_existing(path: str | Path, overwrite: bool = False) -> None:
    """Refuse to replace a result file unless told to (``--overwrite``)."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass --overwrite to replace it")
