"""The plain model as the training attacks and losses call it: eager, or through ``torch.compile``.

Masks are applied functionally (``torch.func.functional_call`` with substituted weights), so the
compiled graph takes the weights as inputs: one graph serves every mask, a new mask never
recompiles, and the model itself stays a plain ``nn.Module`` (no wrapper in its state dict).
Compilation is an acceleration, never a requirement: where it is unsupported the forward falls back
to eager with one warning that says why.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

_NO_WEIGHTS: Mapping[str, Tensor] = {}

#: Graphs one process may compile for the model forward. Every ``ModelForward`` shares TorchDynamo's
#: cache for it, and each combination of train/eval mode, gradients on or off, autocast, BatchNorm
#: momentum (S2AP's second pass and AWP set it to 0), substituted weights and batch size is a graph:
#: one S2AP stage needs 8, a study runs several stages in one process. Past TorchDynamo's default
#: limit (8) the forward would silently run eager.
RECOMPILE_LIMIT = 64


def masked_forward(model: nn.Module, weights: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Run the plain model with some of its weights substituted.

    Parameters and buffers not named in ``weights`` are the model's own, so BatchNorm running
    statistics update in place exactly as in a normal forward.
    """
    return functional_call(model, dict(weights), (x,), strict=False)


def compile_unsupported_reason() -> str | None:
    """Why ``torch.compile`` cannot run in this interpreter, or None where it can (as far as known)."""
    try:
        from torch._dynamo import is_dynamo_supported
    except ImportError:  # pragma: no cover - every torch this project supports has it
        return "this torch has no torch._dynamo"
    if not is_dynamo_supported():
        return "torch.compile (TorchDynamo) does not support this Python version or platform"
    return None


@functools.cache
def compile_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "this could not be compiled" (not "this model or input is wrong").

    TorchDynamo's own (unsupported code, a failed backend, Inductor's wrapped errors) and Inductor's
    toolchain errors. Anything else raised by a compiled call (a shape error, out of memory)
    propagates as it would eager.
    """
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler, OperatorIssue

    return (TorchDynamoException, CppCompileError, InvalidCxxCompiler, OperatorIssue)


def describe_compile_error(err: BaseException) -> str:
    """``Type: first line`` of the error that stopped compilation, for the fallback warning.

    TorchDynamo wraps a failing backend (Inductor without a C++ compiler, say) in
    ``BackendCompilerFailed``, whose own first line only says which backend raised: the wrapped
    error is the reason a user can act on.
    """
    err = getattr(err, "inner_exception", None) or err
    first_line = (str(err).strip().splitlines() or [""])[0][:300]
    return f"{type(err).__name__}: {first_line}"


class ModelForward:
    """``fwd(x, weights)``: logits of ``model`` with ``weights`` substituted, eager or compiled.

    Compiling raises TorchDynamo's recompile limit of the process to at least
    :data:`RECOMPILE_LIMIT` (a global setting; see there why).

    Args:
        model: the plain model; the compiled function reads its current parameters on every call.
        compile: run through ``torch.compile`` (default mode). The first call of each graph compiles
            (tens of seconds for a ResNet-18); later calls, and new masks, reuse it.

    If compiling fails (no C++ compiler for the CPU backend, an unsupported Python, an operation
    TorchDynamo cannot trace: :func:`compile_errors`), the error is reported once as a warning and
    every later call runs eager: the numbers are the same, only slower. Errors of the computation
    itself propagate unchanged. A failure while compiling the backward graph
    (compiled lazily, on the first backward) is not caught here; it surfaces as the error it is.

    """

    def __init__(self, model: nn.Module, compile: bool = False) -> None:
        self.model = model
        self.compile = compile
        self.fallback_reason: str | None = None
        self._compiled: Callable[[Mapping[str, Tensor], Tensor], Tensor] | None = None

    def __getstate__(self) -> dict:
        # Copies (deepcopy, pickling for spawned processes) compile their own function on first use.
        return {**self.__dict__, "_compiled": None}

    @property
    def compiled(self) -> bool:
        """Whether calls go through ``torch.compile`` (False once it fell back to eager)."""
        return self.compile and self.fallback_reason is None

    def _substituted(self, weights: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return masked_forward(self.model, weights, x)

    def _compiled_fn(self) -> Callable[[Mapping[str, Tensor], Tensor], Tensor] | None:
        if not self.compiled:
            return None
        if self._compiled is None:
            reason = compile_unsupported_reason()
            if reason is not None:
                self._fall_back(reason)
                return None
            # Static shapes: a run sees two batch sizes (full batches and the epoch's last one), and
            # a dynamic-shape graph compiled on seeing the second would serve the full batches too.
            self._compiled = torch.compile(self._substituted, dynamic=False)
            config = torch._dynamo.config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        return self._compiled

    def _fall_back(self, reason: str) -> None:
        self._compiled = None
        self.fallback_reason = reason
        warnings.warn(
            f"compile=true is not usable here, training runs eager (same results, slower): {reason}",
            RuntimeWarning,
            stacklevel=3,
        )

    def __call__(self, x: Tensor, weights: Mapping[str, Tensor] | None = None) -> Tensor:
        weights = _NO_WEIGHTS if weights is None else weights
        compiled = self._compiled_fn()
        if compiled is not None:
            errors = compile_errors()
            try:
                return compiled(weights, x)
            except errors as err:
                self._fall_back(describe_compile_error(err))
        if not weights:
            return self.model(x)
        return self._substituted(weights, x)

    def bind(self, weights: Mapping[str, Tensor] | None) -> Callable[[Tensor], Tensor]:
        """A one-argument model function (what attacks and robust losses take) for these weights."""
        return lambda x: self(x, weights)
