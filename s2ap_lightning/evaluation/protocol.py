"""The evaluation protocol: clean, PGD and AutoAttack accuracy with gradient-masking checks.

One protocol serves ``s2ap test``, the demo, the study and the notebook, so every published number
went through the same attacks and the same checks. It works per image: each batch yields, for every
image, whether it is classified correctly clean, under the final PGD, under a weaker PGD, at eps 0 and
(on the AutoAttack subset) under AutoAttack. :func:`summarise` turns those flags into figures and
checks, which makes every comparison a comparison on the same images and lets a distributed test
gather flags by image index (no image counted twice, none missing).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from s2ap_lightning.attacks.pgd import NORMS, AttackConfig, attack_context, pgd_ce
from s2ap_lightning.data.subsets import class_counts, stratified_indices
from s2ap_lightning.evaluation.autoattack import AutoAttackPlan, autoattack_adversarial, autoattack_plan
from s2ap_lightning.pruning.scores import masked_forward

FLAGS = ("clean", "pgd", "pgd_fewer", "eps0", "aa", "in_aa")

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
    """What an evaluation runs.

    Args:
        eps: attack budget.
        step_size: PGD step size.
        norm: ``linf`` or ``l2``.
        pgd_steps: steps of the final PGD (cross-entropy, random start).
        pgd_restarts: random restarts of the final PGD.
        aa_images: images attacked with AutoAttack, a seeded class-stratified sample of the evaluated
            images (0 skips AutoAttack; at least the whole set takes all of it).
        aa_version: ``standard``, ``plus`` or ``rand``.
        aa_batch_size: AutoAttack batch size.
        subset_seed: seed of the AutoAttack sample (and of attack starts in :func:`evaluate`).
        tolerance: noise allowed by the checks, as a fraction of the images compared (at least one
            image): two attacks with random starts differ by a few images on any real model, while
            gradient masking shows as differences of several points.
        batch_size: batch size of the clean and PGD passes in :func:`evaluate`.

    """

    eps: float
    step_size: float
    norm: str = "linf"
    pgd_steps: int = 50
    pgd_restarts: int = 1
    aa_images: int = 1000
    aa_version: str = "standard"
    aa_batch_size: int = 500
    subset_seed: int = 0
    tolerance: float = 0.005
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is unknown; valid: {', '.join(NORMS)}")
        for name, low in (("pgd_steps", 1), ("pgd_restarts", 1), ("aa_images", 0), ("aa_batch_size", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {low}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError(f"tolerance={self.tolerance} must lie in [0, 1)")

    @property
    def fewer_pgd_steps(self) -> int:
        """Steps of the weaker PGD of the "more steps must not help the model" check (10 vs 50)."""
        return 10 if self.pgd_steps > 10 else max(1, self.pgd_steps // 2)

    def attack(self, steps: int | None = None, eps: float | None = None) -> AttackConfig:
        return AttackConfig(
            self.eps if eps is None else eps, self.step_size, steps or self.pgd_steps, self.norm
        )


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def evaluate_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    protocol: EvalProtocol,
    plan: AutoAttackPlan | None = None,
    in_aa: Tensor | None = None,
    seed: int = 0,
) -> tuple[dict[str, Tensor], list[str]]:
    """Per-image correctness flags of one batch (see :data:`FLAGS`) and AutoAttack's warnings.

    ``in_aa`` marks the images of the batch in the AutoAttack sample (``plan`` says which attacks).
    """
    with attack_context(model):
        # Clones: tensors made under inference mode cannot enter an autograd graph.
        x, y = x.clone(), y.clone()
        flags = {"clean": _correct(model, x, y)}
        x_adv = pgd_ce(model, x, y, protocol.attack(), protocol.pgd_restarts)
        flags["pgd"] = _correct(model, x_adv, y)
        flags["pgd_fewer"] = _correct(
            model, pgd_ce(model, x, y, protocol.attack(protocol.fewer_pgd_steps)), y
        )
        flags["eps0"] = _correct(model, pgd_ce(model, x, y, protocol.attack(1, eps=0.0)), y)
        in_aa = torch.zeros_like(y, dtype=torch.bool) if in_aa is None else in_aa.to(y.device).bool()
        flags["aa"], flags["in_aa"] = torch.zeros_like(in_aa), in_aa
        warnings: list[str] = []
        if plan is not None and bool(in_aa.any()):
            x_aa, warnings = autoattack_adversarial(
                model, x[in_aa], y[in_aa], protocol.eps, plan, protocol.norm, protocol.aa_batch_size, seed
            )
            flags["aa"][in_aa] = _correct(model, x_aa, y[in_aa])
    return flags, warnings


def pgd_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, config: AttackConfig, restarts: int = 1, batch_size: int = 256
) -> float:
    """Accuracy under one PGD (fp32, eval mode): the quick figure of model selection and mask checks.

    Not the protocol: no AutoAttack and no checks. Selection (a validation split) and the mask robust
    accuracy before finetuning use it; published test figures come from :func:`evaluate`.
    """
    device = next(model.parameters()).device
    correct = 0
    with attack_context(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            correct += int(_correct(model, pgd_ce(model, xb, yb, config, restarts), yb).sum())
    return correct / max(len(x), 1)


def gradient_masking_checks(
    figures: Mapping[str, float | None],
    n_images: int,
    n_aa_images: int = 0,
    aa_warnings: list[str] | tuple[str, ...] = (),
    tolerance: float = 0.005,
) -> dict[str, dict[str, Any]]:
    """Checks that catch gradient masking and broken evaluations, each on the same images.

    On all evaluated images: final PGD <= clean; eps-0 accuracy == clean; more PGD steps do not raise
    accuracy (final PGD <= weaker PGD). On the AutoAttack sample: AutoAttack <= PGD <= clean there, and
    AutoAttack's own warnings are failures. Comparisons allow ``tolerance`` of the images compared
    (at least one image) for the randomness of attack starts.
    """

    def tol(n: int) -> float:
        return max(tolerance, 1.0 / max(n, 1)) + 1e-9

    def at_most(a: str, b: str, n: int) -> dict[str, Any]:
        passed = figures[a] <= figures[b] + tol(n)
        return {"passed": bool(passed), "detail": f"{a} {figures[a]:.4f} vs {b} {figures[b]:.4f} (n={n})"}

    checks = {
        "pgd_at_most_clean": at_most("pgd_acc", "clean_acc", n_images),
        "eps0_equals_clean": {
            "passed": abs(figures["eps0_acc"] - figures["clean_acc"]) <= 1e-9,
            "detail": f"eps=0 robust {figures['eps0_acc']:.4f} vs clean {figures['clean_acc']:.4f}",
        },
        "more_steps_not_higher": at_most("pgd_acc", "pgd_fewer_acc", n_images),
    }
    if n_aa_images:
        checks["aa_at_most_pgd"] = at_most("aa_acc", "aa_subset_pgd_acc", n_aa_images)
        checks["aa_at_most_clean"] = at_most("aa_acc", "aa_subset_clean_acc", n_aa_images)
        checks["autoattack_warnings"] = {"passed": not aa_warnings, "detail": "; ".join(aa_warnings)}
    return checks


@dataclass
class EvalRecord:
    """Figures of one evaluation, what each rests on, and the checks."""

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
    protocol: dict[str, Any]
    pgd_fewer_steps: int
    autoattack: str | None
    autoattack_skipped: dict[str, str]
    autoattack_warnings: list[str]
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    protocol_name: str | None = None

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks.values())

    def failures(self) -> list[str]:
        return [f"{name}: {c['detail']}" for name, c in self.checks.items() if not c["passed"]]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "all_checks_passed": self.passed}


def protocol_name(
    protocol: EvalProtocol, n_images: int, n_aa_images: int, plan: AutoAttackPlan | None
) -> str | None:
    """:data:`AP_BENCHMARK` when this evaluation ran the benchmark's protocol, else None.

    Decided from what ran, not from a label in a config: a record says it is the benchmark's only
    when every AutoAttack attack ran at eps 0.031 on 10,000 images and no other images were evaluated.
    """
    if (
        plan is not None
        and not plan.skipped
        and plan.version == "standard"
        and protocol.norm == "linf"
        and abs(protocol.eps - AP_BENCHMARK_EPS) < 1e-12
        and n_images == n_aa_images == AP_BENCHMARK_IMAGES
    ):
        return AP_BENCHMARK
    return None


def summarise(
    flags: Mapping[str, Tensor],
    labels: Tensor,
    protocol: EvalProtocol,
    plan: AutoAttackPlan | None = None,
    aa_warnings: list[str] | tuple[str, ...] = (),
) -> EvalRecord:
    """Figures and checks from per-image flags (all images evaluated, AutoAttack where ``in_aa``)."""
    f = {k: v.detach().cpu().bool() for k, v in flags.items()}
    labels = labels.detach().cpu()
    n, in_aa = len(labels), f["in_aa"]
    n_aa = int(in_aa.sum())

    def mean(flag: Tensor) -> float:
        return float(flag.double().mean()) if len(flag) else float("nan")

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
    checks = gradient_masking_checks(figures, n, n_aa, warnings, protocol.tolerance)
    return EvalRecord(
        **figures,
        n_images=n,
        n_aa_images=n_aa,
        class_counts=class_counts(labels),
        aa_class_counts=class_counts(labels[in_aa]),
        protocol=asdict(protocol),
        pgd_fewer_steps=protocol.fewer_pgd_steps,
        autoattack=plan.describe() if (plan is not None and n_aa) else None,
        autoattack_skipped=dict(plan.skipped) if (plan is not None and n_aa) else {},
        autoattack_warnings=warnings,
        checks=checks,
        protocol_name=protocol_name(protocol, n, n_aa, plan if n_aa else None),
    )


def aa_membership(labels: Tensor, protocol: EvalProtocol) -> Tensor:
    """Boolean mask of the AutoAttack sample: ``aa_images`` images, class-stratified, seeded."""
    member = torch.zeros(len(labels), dtype=torch.bool)
    if protocol.aa_images:
        member[stratified_indices(labels, protocol.aa_images, protocol.subset_seed)] = True
    return member


def evaluate(model: nn.Module, x: Tensor, y: Tensor, protocol: EvalProtocol) -> EvalRecord:
    """Run the whole protocol on a plain model and in-memory images (the demo, the study, notebooks).

    Attack starts are seeded with ``protocol.subset_seed`` without disturbing the caller's RNG.
    """
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        num_classes = int(model(x[:1].to(device)).shape[1])
    plan = autoattack_plan(num_classes, protocol.aa_version) if protocol.aa_images else None
    member = aa_membership(y, protocol)
    devices = [device.index or 0] if device.type == "cuda" else []
    parts: dict[str, list[Tensor]] = {k: [] for k in FLAGS}
    warnings: list[str] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(protocol.subset_seed)
        for i in range(0, len(x), protocol.batch_size):
            xb, yb = x[i : i + protocol.batch_size].to(device), y[i : i + protocol.batch_size].to(device)
            flags, _ = evaluate_batch(model, xb, yb, protocol)
            for k in FLAGS:
                parts[k].append(flags[k].cpu())
        merged = {k: torch.cat(v) for k, v in parts.items()}
        if plan is not None and bool(member.any()):
            # AutoAttack batches by itself: one call on the whole sample.
            xa, ya = x[member].to(device), y[member].to(device)
            with attack_context(model):
                x_aa, warnings = autoattack_adversarial(
                    model,
                    xa,
                    ya,
                    protocol.eps,
                    plan,
                    protocol.norm,
                    protocol.aa_batch_size,
                    protocol.subset_seed,
                )
                merged["aa"][member] = _correct(model, x_aa, ya).cpu()
            merged["in_aa"] = member
    return summarise(merged, y, protocol, plan, warnings)


def write_record(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Write a JSON evaluation record atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
