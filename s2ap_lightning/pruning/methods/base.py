"""The base-method plug-in: a method's specification and the runtime state it builds.

A score-based base method (HYDRA, HARP, ...) is two objects, because they live at different times:

- :class:`BaseMethod`, the *specification*: the method's options only, as typed ``__init__``
  arguments validated there. It holds no model and is cheap, so the command line can parse it
  (``--model.method harp --model.method.rate_bound 6``), hyper-parameters can store it
  (:meth:`BaseMethod.config`, primitives only) and a restored checkpoint can be compared with it
  (:attr:`BaseMethod.mask_defining`) before anything is built.
- :class:`MethodState`, built by :meth:`BaseMethod.build` once the model and the sparsity are known:
  an ``nn.Module`` holding the scores, the method's own parameters and buffers (which therefore
  travel in every checkpoint), the mask rule and the hooks the mask search calls. The stage never
  asks which method it holds.

Subclassing :class:`BaseMethod` with a ``name`` registers the method (:data:`METHODS`), so a new
method is one new module and nothing else; :func:`method_from_config` turns a name, a
``{"class_path", "init_args"}`` mapping or an object into a specification, and
:func:`method_from_legacy` reads the flat options of checkpoints written before this split.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from s2ap_lightning.pruning.masks import scaled_score_init
from s2ap_lightning.pruning.scores import (
    init_scores,
    masks_from_counts,
    prunable_weight_names,
    score_key,
    straight_through_weights,
)

#: Every registered method by its ``name``; a subclass of :class:`BaseMethod` with a ``name`` adds itself.
METHODS: dict[str, type[BaseMethod]] = {}

#: The flat hyper-parameters through which checkpoints written before the split chose and configured
#: their method (see :func:`method_from_legacy`).
LEGACY_KEYS = (
    "base_method",
    "scope",
    "min_layer_keep",
    "size_loss_weight",
    "rate_grad",
    "rate_bound",
    "density_tolerance",
)

#: Option values :meth:`BaseMethod.config` can store in hyper-parameters and YAML.
_PRIMITIVES = (type(None), bool, int, float, str)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class BaseMethod:
    """A base method's specification: its name, its options, and how to build its state.

    A subclass sets :attr:`name` (which registers it), takes its options as typed ``__init__``
    arguments with defaults, validates them there (errors naming the value and the valid range),
    stores each under the attribute of the same name, and sets :attr:`state_class` to its
    :class:`MethodState` subclass (or overrides :meth:`build`).
    """

    #: Registry name: what ``--model.method`` and :func:`method_from_config` accept.
    name: ClassVar[str] = ""
    #: The options that, together with the sparsity and the learnt state, define the mask: a
    #: checkpoint restored under other values would not reproduce the mask it was searched with.
    mask_defining: ClassVar[tuple[str, ...]] = ()
    #: The runtime object :meth:`build` makes.
    state_class: ClassVar[type[MethodState]]

    def __init__(self) -> None:
        """No options: a subclass's ``__init__`` takes its own, each with a default."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # an unnamed subclass is a variant or an abstract helper
            _register(cls)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The method's options: the parameters of its ``__init__``."""
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        return tuple(p.name for p in params)

    def options(self) -> dict[str, Any]:
        """The current value of every option (each is stored under its own name)."""
        missing = [k for k in self.option_names() if not hasattr(self, k)]
        if missing:
            raise TypeError(
                f"{type(self).__name__} does not store option(s) {', '.join(missing)} under their own "
                "name; config() and mask checks read them from there"
            )
        return {k: getattr(self, k) for k in self.option_names()}

    def config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``: jsonargparse's form, primitives only.

        What the stage stores in its hyper-parameters; :func:`method_from_config` reads it back.
        """
        options = self.options()
        bad = {k: v for k, v in options.items() if not isinstance(v, _PRIMITIVES)}
        if bad:
            raise TypeError(
                f"{type(self).__name__}: option(s) {', '.join(f'{k}={v!r}' for k, v in bad.items())} are "
                "not None, bool, int, float or str, so they cannot be stored in hyper-parameters"
            )
        return {"class_path": _class_path(type(self)), "init_args": options}

    def check_sparsity(self, sparsity: float) -> None:
        """Refuse a sparsity outside ``(0, 1)``; subclasses add option checks that need the sparsity.

        Called by :class:`MethodState` before anything is built; the checks that need the model
        (a layer left empty) follow in the state's ``__init__``.
        """
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity!r} is out of range: it must lie in (0, 1)")

    def build(self, model: nn.Module, sparsity: float) -> MethodState:
        """The method's runtime state over ``model``'s prunable weights at ``sparsity`` (pruned fraction)."""
        return self.state_class(self, model, sparsity)

    def mask_differences(self, other: BaseMethod) -> dict[str, tuple[Any, Any]]:
        """``{option: (mine, other's)}`` for every mask-defining difference; ``method`` if the class differs.

        The stage calls this with the method a checkpoint was searched with before restoring it.
        """
        if type(self) is not type(other):
            return {"method": (self.name, other.name)}
        mine, theirs = self.options(), other.options()
        return {k: (mine[k], theirs[k]) for k in self.mask_defining if mine[k] != theirs[k]}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BaseMethod):
            return NotImplemented
        return type(self) is type(other) and self.options() == other.options()

    __hash__ = None  # mutable options: equal objects may not stay equal

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"


def _register(cls: type[BaseMethod]) -> None:
    """Add ``cls`` to :data:`METHODS`, refusing what would only fail later, at build or parse time."""
    name = cls.__dict__["name"]
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(
            f"{cls.__name__}.name={name!r}: a method's name must be an identifier such as 'hydra'"
        )
    taken = METHODS.get(name)
    if taken is not None and _class_path(taken) != _class_path(cls):
        raise TypeError(f"method name {name!r} of {_class_path(cls)} is taken by {_class_path(taken)}")
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{cls.__name__}.__init__ takes *{p.name}: options must be named arguments")
        if p.default is p.empty:
            raise TypeError(
                f"{cls.__name__}.__init__'s option {p.name!r} has no default: the name alone must build "
                "the method (--model.method NAME)"
            )
    unknown = [k for k in cls.mask_defining if k not in cls.option_names()]
    if unknown:
        raise TypeError(f"{cls.__name__}.mask_defining names {', '.join(unknown)}, which are not its options")
    state = getattr(cls, "state_class", None)
    if cls.build is BaseMethod.build and not (isinstance(state, type) and issubclass(state, MethodState)):
        raise TypeError(f"{cls.__name__} sets no state_class (a MethodState subclass) and no build()")
    METHODS[name] = cls


def method_names() -> tuple[str, ...]:
    """The names of every registered method, in registration order (the built-ins first)."""
    return tuple(METHODS)


def method_class(reference: str) -> type[BaseMethod]:
    """The method class a registry name, a class name or a ``module.Class`` path refers to.

    A path not registered yet is imported, which registers it: a method in the user's own module
    needs no registration step.
    """
    if reference in METHODS:
        return METHODS[reference]
    matches = [c for c in METHODS.values() if reference in (_class_path(c), c.__name__)]
    if len(matches) == 1:
        return matches[0]
    valid = ", ".join(METHODS)
    if len(matches) > 1:
        paths = ", ".join(_class_path(c) for c in matches)
        raise ValueError(f"method={reference!r} is ambiguous ({paths}); use a registered name: {valid}")
    module, _, attr = reference.rpartition(".")
    if module:
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, BaseMethod) and cls is not BaseMethod:
            return cls
    raise ValueError(
        f"method={reference!r} is unknown; valid: {valid} (or a BaseMethod subclass's module.Class)"
    )


def method_from_config(value: BaseMethod | str | Mapping[str, Any]) -> BaseMethod:
    """A method specification from an object, a name (default options) or a ``class_path`` mapping.

    The mapping is :meth:`BaseMethod.config`'s (and jsonargparse's) form, ``{"class_path": name or
    path, "init_args": {...}}``; an option the method does not take fails naming it and the valid ones.
    """
    if isinstance(value, BaseMethod):
        return value
    if isinstance(value, str):
        return method_class(value)()
    if hasattr(value, "as_dict") and not isinstance(value, Mapping):
        value = value.as_dict()  # a jsonargparse Namespace
    if not isinstance(value, Mapping):
        raise TypeError(f"method={value!r}: expected a name, a class_path mapping or a BaseMethod")
    extra = sorted(set(value) - {"class_path", "init_args"})
    if "class_path" not in value or extra:
        raise ValueError(
            f"method={dict(value)!r}: a mapping needs 'class_path' and optionally 'init_args'"
            + (f", not {', '.join(extra)}" if extra else "")
        )
    cls = method_class(value["class_path"])
    args = dict(value.get("init_args") or {})
    unknown = sorted(set(args) - set(cls.option_names()))
    if unknown:
        raise ValueError(
            f"method {cls.name!r} has no option {', '.join(unknown)}; valid: {', '.join(cls.option_names())}"
        )
    return cls(**args)


def method_from_legacy(hparams: Mapping[str, Any]) -> BaseMethod:
    """The method that flat hyper-parameters (:data:`LEGACY_KEYS`) of an older checkpoint chose.

    Only the chosen method's own options are read, as the old stage did (it carried every method's
    options whatever ran). ``scope='global'`` with a method that has no scope was refused then and is
    refused here.
    """
    name = hparams.get("base_method", "hydra")
    if name not in METHODS:
        raise ValueError(f"base_method={name!r} is unknown; valid: {', '.join(METHODS)}")
    cls = METHODS[name]
    own = cls.option_names()
    args = {k: hparams[k] for k in LEGACY_KEYS[1:] if k in own and k in hparams}
    if "scope" not in own and hparams.get("scope", "layer") != "layer":
        raise ValueError(
            f"scope={hparams['scope']!r} does not apply to base_method={name!r} (it has no pruning scope)"
        )
    return cls(**args)


class MethodState(nn.Module):
    """A built base method: scores over the prunable weights, the mask rule and the search's hooks.

    Args:
        method: the specification (its options are read from it, never copied).
        model: the plain network whose weights are scored. It is not registered as a submodule, so
            this module's state dict holds the method's own tensors only.
        sparsity: pruned fraction in (0, 1), checked by ``method.check_sparsity``.

    State-dict keys (relative to this module): ``scores.<layer key>`` for every prunable weight, the
    layer key being its name with ``.`` replaced by ``__``; subclasses add their own.

    A subclass defines :meth:`kept_counts` (or overrides :meth:`masks` for a mask that is not a
    per-layer top-k of ``|s|``), checks in ``__init__`` that no layer can be left empty, and
    overrides the hooks it needs. The neutral hooks are HYDRA's: no extra loss, nothing after a
    step, every mask within budget.

    """

    def __init__(self, method: BaseMethod, model: nn.Module, sparsity: float) -> None:
        super().__init__()
        method.check_sparsity(sparsity)
        self.method = method
        self.sparsity = sparsity
        self.names = prunable_weight_names(model)
        self.scores = init_scores(model, self.names)

    # ----------------------------------------------------------------- scores
    def __getitem__(self, name: str) -> nn.Parameter:
        return self.scores[score_key(name)]

    def items(self) -> list[tuple[str, nn.Parameter]]:
        """``(weight name, score)`` for every prunable weight, in the model's order."""
        return [(n, self[n]) for n in self.names]

    def layer_sizes(self) -> dict[str, int]:
        """Number of weights of every prunable layer, in the order of ``names``."""
        return {n: s.numel() for n, s in self.items()}

    @torch.no_grad()
    def reinitialise(self, model: nn.Module) -> None:
        """Scaled score init from the model's current weights (after ``init_from`` loaded them)."""
        params = dict(model.named_parameters())
        for name, score in self.items():
            score.copy_(scaled_score_init(params[name]))

    # ----------------------------------------------------------------- masks
    def kept_counts(self) -> dict[str, int]:
        """Per-layer number of kept weights: the method's rule."""
        raise NotImplementedError(f"{type(self).__name__} defines no kept_counts()")

    def masks(self) -> dict[str, Tensor]:
        """Binary masks of the current scores: the top ``kept_counts()[layer]`` of ``|s|`` per layer."""
        return masks_from_counts(self.items(), self.kept_counts())

    def effective_weights(
        self, model: nn.Module, masks: Mapping[str, Tensor], differentiable: bool = True
    ) -> dict[str, Tensor]:
        """``w * M(s)``; with ``differentiable`` the straight-through path to the scores is kept.

        The non-differentiable version is what the attacks use: no graph to the scores.
        """
        return straight_through_weights(model, self.items(), masks, differentiable)

    def weights_at(
        self, model: nn.Module, point: Mapping[str, Tensor], differentiable: bool = True
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(w * M(point), M(point))`` at scores ``point`` (layer name -> tensor).

        The masks come from this method's own rule (HARP's learnt rates included); the stored scores
        are not touched. The analyses (sharpness, landscapes) take the loss at other score points
        through this, so they never re-implement the mask.
        """
        params = {f"scores.{score_key(n)}": t for n, t in point.items()}

        def at_point() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
            masks = self.masks()
            return self.effective_weights(model, masks, differentiable), masks

        return functional_call(self, params, (), {"_thunk": at_point}, strict=False)

    def forward(self, _thunk: object = None) -> object:
        # functional_call's entry point: runs ``_thunk`` with the substituted scores (weights_at).
        return _thunk()

    def density(self, masks: Mapping[str, Tensor]) -> float:
        """Fraction of prunable weights kept."""
        kept = sum(float(m.sum()) for m in masks.values())
        return kept / sum(m.numel() for m in masks.values())

    # ----------------------------------------------------------------- the search's hooks
    def extra_loss(self) -> Tensor | None:
        """A term added to the robust loss of every pass (HARP's weighted size loss); None: none."""
        return None

    def after_optimizer_step(self) -> None:
        """Called after every optimiser step (HARP clamps its rates)."""

    def end_of_epoch(self, density: float, epoch: int) -> dict[str, float]:
        """Called with the mask density after every search epoch; returns figures to log."""
        return {}

    def within_budget(self) -> bool:
        """Whether the current mask may become ``best.ckpt`` (HYDRA's exact counts always may)."""
        return True

    def end_of_search_warning(self) -> str | None:
        """A message for the user when the search ends outside what the method promised."""
        return None
