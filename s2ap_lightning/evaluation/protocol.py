"""The evaluation protocol: clean, PGD and AutoAttack accuracy with gradient-masking checks.

One protocol serves ``s2ap test``, the demo, the study and the notebook, so every published number
went through the same attacks and the same checks. It works per image: each batch yields, for every
image, whether it is classified correctly clean, under the final PGD, under a weaker PGD, at eps 0 and
(on the AutoAttack sample) under AutoAttack, and whether PGD can move from it at all (a non-zero
gradient). :func:`summarise` turns those flags into figures and checks, which makes every comparison
a comparison on the same images, judged on the images where the two disagree
(:mod:`s2ap_lightning.evaluation.checks`).

What is attacked with (norm, budget, step size) is a :class:`~s2ap_lightning.attacks.ThreatModel`;
how the evaluation runs (steps, restarts, AutoAttack sample, seed, check settings) an
:class:`EvalProtocol`. :func:`evaluate` takes both.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from s2ap_lightning.attacks.pgd import ThreatModel, attack_context, pgd_ce
from s2ap_lightning.checkpoint import atomic_file
from s2ap_lightning.checks import check_range
from s2ap_lightning.data.subsets import class_counts, stratified_indices
from s2ap_lightning.evaluation.autoattack import (
    AA_VERSIONS,
    AutoAttackPlan,
    autoattack_adversarial,
    autoattack_plan,
)
from s2ap_lightning.evaluation.checks import gradient_masking_checks
from s2ap_lightning.models.modes import eval_mode
from s2ap_lightning.pruning.scores import masked_forward

#: The adversarial pruning benchmark's evaluation (pralab/AdversarialPruningBenchmark,
#: ``utils/test.py:test_model_aa``): AutoAttack standard, L-inf, eps 0.031 (not 8/255), the first
#: 10,000 test images (all of CIFAR-10's), inputs in [0, 1]. ``configs/eval/ap_benchmark.yaml`` sets it.
AP_BENCHMARK = (
    "ap_benchmark: the adversarial pruning benchmark's protocol (AutoAttack standard, L-inf eps 0.031, "
    "on each of 10,000 test images)"
)
AP_BENCHMARK_EPS, AP_BENCHMARK_IMAGES = 0.031, 10_000


class MaskedModel(nn.Module):
    """A plain model evaluated with some weights substituted (e.g. ``w_pretrained * M(s*)``)."""

    def __init__(self, model: nn.Module, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.model = model
        self.weights = {k: v.detach() for k, v in weights.items()}

    def forward(self, x: Tensor) -> Tensor:
        return masked_forward(self.model, self.weights, x)


@dataclass(frozen=True)
class EvalProtocol:
    """How an evaluation runs; WHAT it attacks with is the :class:`ThreatModel` passed beside it.

    Kept apart from the threat model so that one protocol evaluates a model at several budgets, and a
    record says separately what was attacked with (``threat_model``) and how (``protocol``).

    Args:
        pgd_steps: steps of the final PGD (cross-entropy, random start, the threat's step size).
        pgd_restarts: random restarts of the final PGD.
        aa_images: images attacked with AutoAttack, a seeded class-stratified sample of the evaluated
            images (0 skips AutoAttack; at least the whole set takes all of it).
        aa_version: ``standard``, ``plus`` or ``rand``.
        aa_batch_size: AutoAttack batch size.
        seed: seeds the AutoAttack sample, AutoAttack itself and the PGD random starts (in a forked
            RNG: the caller's random stream is untouched).
        batch_size: images per batch of the clean and PGD passes. Part of the protocol: the random
            starts are drawn batch by batch, so PGD figures depend on it (as on the seed); the clean
            and eps-0 figures do not.
        check_level: level of the checks' exact one-sided binomial (McNemar) test; see
            :mod:`s2ap_lightning.evaluation.checks` for why 0.01.
        check_min_effect: smallest accuracy difference, as a fraction of the images compared, that can
            fail a check (0.005: half a point; see :mod:`s2ap_lightning.evaluation.checks`).
        collapse_margin: a model is *collapsed* when its clean accuracy is at most the majority-class
            rate of the evaluated images plus this margin: it does no better than always answering
            the most common class, and its failed checks say nothing about gradient masking. 0.02
            (two points): on 1,000 images of 10 balanced classes, a constant answer scores 10 % with
            a standard deviation of about one point, so two points covers the noise, while any model
            that learnt something (even a weak robust one) is tens of points above.

    """

    pgd_steps: int = 50
    pgd_restarts: int = 1
    aa_images: int = 1000
    aa_version: str = "standard"
    aa_batch_size: int = 500
    seed: int = 0
    batch_size: int = 256
    check_level: float = 0.01
    check_min_effect: float = 0.005
    collapse_margin: float = 0.02

    def __post_init__(self) -> None:
        for name, low in (
            ("pgd_steps", 1),
            ("pgd_restarts", 1),
            ("aa_images", 0),
            ("aa_batch_size", 1),
            ("seed", 0),
            ("batch_size", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name}={value!r} must be an integer in [{low}, inf)")
            check_range(name, value, low, None)
        if self.aa_version not in AA_VERSIONS:
            raise ValueError(f"aa_version={self.aa_version!r} is unknown; valid: {', '.join(AA_VERSIONS)}")
        for name in ("check_level", "check_min_effect", "collapse_margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name}={value!r} must be a number")
        check_range("check_level", self.check_level, 0.0, 1.0, low_open=True, high_open=True)
        check_range("check_min_effect", self.check_min_effect, 0.0, 1.0, high_open=True)
        check_range("collapse_margin", self.collapse_margin, 0.0, 1.0)

    @property
    def fewer_pgd_steps(self) -> int:
        """Steps of the weaker PGD of the "more steps must not help the model" check (10 vs 50)."""
        return 10 if self.pgd_steps > 10 else max(1, self.pgd_steps // 2)


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def _zero_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per image, whether the cross-entropy gradient at the clean image is exactly zero.

    PGD steps along the gradient's sign (L-inf) or direction (L2); from such an image it never moves.
    Saturated logits (the loss rounds to 0 in fp32) and quantised inputs (rounding has no gradient)
    give exact zeros; a healthy model does not.
    """
    x = x.detach().float().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x).float(), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad.flatten(1).abs().amax(1) == 0


def evaluate_batch(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, protocol: EvalProtocol
) -> dict[str, Tensor]:
    """Per-image flags of one batch: ``clean``, ``zero_grad``, ``pgd``, ``pgd_fewer``, ``eps0``.

    The final PGD has ``protocol.pgd_steps`` steps and ``protocol.pgd_restarts`` restarts, the weaker
    one ``protocol.fewer_pgd_steps``, both at the threat's budget and step size; the eps-0 PGD one
    step. Random starts come from the global RNG (:func:`evaluate` seeds it). AutoAttack is not
    here: it runs once on its whole sample (see :func:`evaluate`).
    """
    with attack_context(model):
        # Clones: tensors made under inference mode cannot enter an autograd graph.
        x, y = x.clone(), y.clone()
        flags = {"clean": _correct(model, x, y), "zero_grad": _zero_gradient(model, x, y)}
        final = threat.with_steps(protocol.pgd_steps)
        flags["pgd"] = _correct(model, pgd_ce(model, x, y, final, protocol.pgd_restarts), y)
        fewer = threat.with_steps(protocol.fewer_pgd_steps)
        flags["pgd_fewer"] = _correct(model, pgd_ce(model, x, y, fewer), y)
        flags["eps0"] = _correct(model, pgd_ce(model, x, y, threat.with_eps(0.0).with_steps(1)), y)
    return flags


def pgd_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, config: ThreatModel, restarts: int = 1, batch_size: int = 256
) -> float:
    """Accuracy under one PGD (fp32, eval mode): the quick figure of model selection and mask checks.

    Not the protocol: no AutoAttack and no checks. Selection (a validation split) and the mask robust
    accuracy before finetuning use it; published test figures come from :func:`evaluate`.
    """
    device = _device(model)
    correct = 0
    with attack_context(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            correct += int(_correct(model, pgd_ce(model, xb, yb, config, restarts), yb).sum())
    return correct / max(len(x), 1)


@dataclass
class EvalRecord:
    """Figures of one evaluation, what each rests on, and the checks.

    ``checks`` maps a check's name to ``passed``, ``verdict`` (``passed``, ``failed`` or
    ``collapsed``), the images compared ``n``, the discordant counts ``a_only``/``b_only``,
    ``p_value``, ``effect`` and ``detail`` (see :mod:`s2ap_lightning.evaluation.checks`).
    ``collapsed`` says the model does no better than its majority class (clean accuracy at most
    ``majority_class_rate + collapse_margin``): its failed checks have verdict ``collapsed`` and
    are not reported as masking by :meth:`failures`.
    """

    clean_acc: float
    pgd_acc: float
    pgd_fewer_acc: float
    eps0_acc: float
    aa_acc: float | None
    aa_subset_clean_acc: float | None
    aa_subset_pgd_acc: float | None
    n_images: int
    n_aa_images: int
    class_counts: dict[int, int]
    aa_class_counts: dict[int, int]
    majority_class_rate: float
    collapsed: bool
    threat_model: dict[str, Any]
    protocol: dict[str, Any]
    pgd_fewer_steps: int
    autoattack: str | None
    autoattack_skipped: dict[str, str]
    autoattack_warnings: list[str]
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    protocol_name: str | None = None

    @property
    def passed(self) -> bool:
        """Every check passed (a collapsed model's failed checks count as not passed)."""
        return all(c["passed"] for c in self.checks.values())

    def failures(self) -> list[str]:
        """Failed checks of a model that is not collapsed: possible gradient masking or broken evaluation."""
        return [f"{name}: {c['detail']}" for name, c in self.checks.items() if c["verdict"] == "failed"]

    def collapsed_failures(self) -> list[str]:
        """Failed checks of a collapsed model: expected of a constant answer, not evidence of masking."""
        return [f"{name}: {c['detail']}" for name, c in self.checks.items() if c["verdict"] == "collapsed"]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "all_checks_passed": self.passed, "masking_suspected": bool(self.failures())}


def protocol_name(
    threat: ThreatModel, n_images: int, n_aa_images: int, plan: AutoAttackPlan | None
) -> str | None:
    """:data:`AP_BENCHMARK` when this evaluation ran the benchmark's protocol, else None.

    Decided from what ran, not from a label in a config: a record says it is the benchmark's only
    when every AutoAttack attack ran at eps 0.031 on 10,000 images and no other images were evaluated.
    """
    if (
        plan is not None
        and not plan.skipped
        and plan.version == "standard"
        and threat.norm == "linf"
        and abs(threat.eps - AP_BENCHMARK_EPS) < 1e-12
        and n_images == n_aa_images == AP_BENCHMARK_IMAGES
    ):
        return AP_BENCHMARK
    return None


def summarise(
    flags: Mapping[str, Tensor],
    labels: Tensor,
    threat: ThreatModel,
    protocol: EvalProtocol,
    plan: AutoAttackPlan | None = None,
    aa_warnings: list[str] | tuple[str, ...] = (),
) -> EvalRecord:
    """Figures and checks from per-image flags (``checks.FLAGS``; AutoAttack where ``in_aa``)."""
    f = {k: v.detach().cpu().bool() for k, v in flags.items()}
    labels = labels.detach().cpu()
    n = len(labels)
    if n == 0:
        raise ValueError("an evaluation needs at least one image; the flags cover none")
    in_aa = f.get("in_aa", torch.zeros(n, dtype=torch.bool))
    n_aa = int(in_aa.sum())

    def mean(flag: Tensor) -> float:
        return float(flag.double().mean())

    figures: dict[str, float | None] = {
        "clean_acc": mean(f["clean"]),
        "pgd_acc": mean(f["pgd"]),
        "pgd_fewer_acc": mean(f["pgd_fewer"]),
        "eps0_acc": mean(f["eps0"]),
        "aa_acc": mean(f["aa"][in_aa]) if n_aa else None,
        "aa_subset_clean_acc": mean(f["clean"][in_aa]) if n_aa else None,
        "aa_subset_pgd_acc": mean(f["pgd"][in_aa]) if n_aa else None,
    }
    warnings = list(dict.fromkeys(aa_warnings))
    checks = gradient_masking_checks(f, warnings, protocol.check_level, protocol.check_min_effect)
    counts = class_counts(labels)
    majority = max(counts.values()) / n
    collapsed = figures["clean_acc"] <= majority + protocol.collapse_margin
    for check in checks.values():
        check["verdict"] = "passed" if check["passed"] else ("collapsed" if collapsed else "failed")
    ran_aa = plan is not None and n_aa > 0
    return EvalRecord(
        **figures,
        n_images=n,
        n_aa_images=n_aa,
        class_counts=counts,
        aa_class_counts=class_counts(labels[in_aa]),
        majority_class_rate=majority,
        collapsed=bool(collapsed),
        threat_model=asdict(threat.with_steps(protocol.pgd_steps)),
        protocol=asdict(protocol),
        pgd_fewer_steps=protocol.fewer_pgd_steps,
        autoattack=plan.describe() if ran_aa else None,
        autoattack_skipped=dict(plan.skipped) if ran_aa else {},
        autoattack_warnings=warnings,
        checks=checks,
        protocol_name=protocol_name(threat, n, n_aa, plan if ran_aa else None),
    )


def aa_membership(labels: Tensor, protocol: EvalProtocol) -> Tensor:
    """Boolean mask of the AutoAttack sample: ``aa_images`` images, class-stratified, seeded."""
    member = torch.zeros(len(labels), dtype=torch.bool)
    if protocol.aa_images:
        member[stratified_indices(labels, protocol.aa_images, protocol.seed)] = True
    return member


def _device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


class _Images:
    """The evaluated images: an ``(x, y)`` tensor pair or a map-style Dataset of ``(x, y[, index])``.

    Both are read by position, so a chunk of a Dataset holds exactly the images (and the AutoAttack
    sample exactly the images) that the same positions of the tensor pair would.
    """

    def __init__(self, data: tuple[Tensor, Tensor] | Dataset) -> None:
        self.tensors: tuple[Tensor, Tensor] | None = None
        self.dataset: Dataset | None = None
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            x, y = data
            if len(x) != len(y):
                raise ValueError(f"data holds {len(x)} images but {len(y)} labels")
            self.tensors = (x, y)
        elif isinstance(data, Dataset) and hasattr(data, "__len__") and not isinstance(data, IterableDataset):
            self.dataset = data
        else:
            raise TypeError(
                "data must be an (x, y) pair of tensors or a map-style Dataset (with __len__) yielding "
                f"(x, y) or (x, y, index); got {type(data).__name__}"
            )

    def __len__(self) -> int:
        return len(self.tensors[0]) if self.tensors is not None else len(self.dataset)  # type: ignore[arg-type]

    def load(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Images and labels at ``index`` (positions), on the CPU; the global RNG is left as it was.

        A dataset's transforms may draw random numbers; they must not shift the attacks' stream, or
        the figures would differ from the tensor path's on the same images.
        """
        if self.tensors is not None:
            x, y = self.tensors
            return x[index.to(x.device)], y[index.to(y.device)].long()
        with torch.random.fork_rng(devices=[]):
            items = [self.dataset[int(i)] for i in index]  # type: ignore[index]
        x = torch.stack([torch.as_tensor(item[0]) for item in items])
        y = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
        return x, y


def evaluate(
    model: nn.Module,
    data: tuple[Tensor, Tensor] | Dataset,
    threat: ThreatModel,
    protocol: EvalProtocol,
) -> EvalRecord:
    """Run the whole protocol on a plain model: clean, PGD, eps-0 PGD, AutoAttack and the checks.

    The one evaluation of the project (``s2ap test`` through
    :class:`~s2ap_lightning.evaluation.callback.EvaluationCallback`, the demo, the study, notebooks):
    the same model, images, threat and protocol give the same record, bit for bit, whoever calls it.
    The PGD starts and AutoAttack are seeded with ``protocol.seed`` in a forked RNG, without
    disturbing the caller's random stream. Runs with gradients enabled even when called under
    ``torch.inference_mode`` (Lightning's test loop).

    Args:
        model: logits of a batch in [0, 1] (e.g. a :class:`MaskedModel`); put in eval mode for the
            evaluation, its submodules' own flags restored afterwards.
        data: an ``(x, y)`` pair of tensors, or a map-style Dataset yielding ``(x, y)`` or
            ``(x, y, index)`` (the index is ignored: images are read by position, in order, in chunks
            of ``protocol.batch_size``), which gives the figures of the tensor path on the same images.
        threat: what to attack with: norm, budget, step size (its ``steps`` are replaced by the
            protocol's step counts).
        protocol: how: step counts, restarts, the AutoAttack sample, seeds, check settings.

    """
    images = _images(data)
    n = len(images)
    if n == 0:
        raise ValueError("evaluate needs at least one image; the data given holds none")
    device = _device(model)
    cuda = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    parts: dict[str, list[Tensor]] = {}
    labels: list[Tensor] = []
    warnings: list[str] = []
    with torch.inference_mode(False), eval_mode(model), torch.random.fork_rng(devices=cuda):
        first, _ = images.load(torch.tensor([0]))
        with attack_context(model), torch.no_grad():
            num_classes = int(model(first.to(device)).shape[1])
        plan = autoattack_plan(num_classes, protocol.aa_version) if protocol.aa_images else None
        torch.manual_seed(protocol.seed)
        for start in range(0, n, protocol.batch_size):
            xb, yb = images.load(torch.arange(start, min(start + protocol.batch_size, n)))
            flags = evaluate_batch(model, xb.to(device), yb.to(device), threat, protocol)
            for k, v in flags.items():
                parts.setdefault(k, []).append(v.cpu())
            labels.append(yb.cpu())
        merged = {k: torch.cat(v) for k, v in parts.items()}
        y = torch.cat(labels)
        member = aa_membership(y, protocol)
        merged["aa"] = torch.zeros(n, dtype=torch.bool)
        merged["in_aa"] = torch.zeros(n, dtype=torch.bool)
        if plan is not None and bool(member.any()):
            # AutoAttack batches by itself: one call on the whole sample, so its own figures (and the
            # percentages in its warnings) are over the sample.
            xa, ya = images.load(torch.nonzero(member).flatten())
            xa, ya = xa.to(device), ya.to(device)
            x_aa, warnings = autoattack_adversarial(
                model, xa, ya, threat.eps, plan, threat.norm, protocol.aa_batch_size, protocol.seed
            )
            with attack_context(model):
                merged["aa"][member] = _correct(model, x_aa, ya).cpu()
            merged["in_aa"] = member
    return summarise(merged, y, threat, protocol, plan, warnings)


def _images(data: tuple[Tensor, Tensor] | Dataset) -> _Images:
    return data if isinstance(data, _Images) else _Images(data)


def write_record(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Write a JSON evaluation record atomically (a crash never leaves half a file)."""
    path = Path(path)
    with atomic_file(path, "w") as fh:
        fh.write(json.dumps(record, indent=2, default=str) + "\n")
    return path
