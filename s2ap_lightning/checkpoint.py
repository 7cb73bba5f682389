"""Safe checkpoint loading and the ``init_from`` hand-off between stages.

Every file is loaded with ``weights_only=True``: a checkpoint from someone else must never run code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
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


def model_state_dict(obj: Any, prefix: str = "model.") -> dict[str, Tensor]:
    """The plain model's weights from a Lightning checkpoint of any stage or a plain state dict."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if isinstance(obj, dict) and all(isinstance(v, Tensor) for v in obj.values()):
        # Plain state dicts, including ones saved from DataParallel/DDP wrappers.
        return {k.removeprefix("module."): v for k, v in obj.items()}
    raise CheckpointError("file is neither a Lightning checkpoint nor a plain state dict")


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
    """Load ``path`` safely and check that its weights fit ``model``; returns (object, weights)."""
    obj = load_file(path)
    try:
        state = model_state_dict(obj)
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


def atomic_torch_save(obj: object, path: str | Path) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``.

    A crash during the write leaves the previous file intact: rename is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; a checkpoint should get the permissions any file would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def refuse_existing(path: str | Path, overwrite: bool = False) -> None:
    """Refuse to replace a result file unless told to (``--overwrite``)."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass --overwrite to replace it")
