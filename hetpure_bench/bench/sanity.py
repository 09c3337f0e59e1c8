"""Sanity checks run with every benchmark row, on a small slice of its images.

Each guards against a way an evaluation fools itself (gradient masking, broken attacks,
uncontrolled randomness):
- eps-zero: with eps = 0 every adversarial prediction equals the clean one and every image's
  robust outcome its clean outcome;
- eps-monotone / steps-monotone: halving the budget or the iterations does not lower robust
  accuracy by more than ``tolerance`` images, i.e. tolerance / n in the mean (final-iterate
  attacks on stochastic defenses are not exactly monotone, hence the slack);
- gradients: the attacked module's input gradient is finite and non-zero for every image;
- unbounded-defended / unbounded-undefended: PGD with eps covering the whole [0,1] box, through
  the row's gradient path and against the bare classifier, leaves at most ``unbounded_accuracy``.
A failed check flags the row; it never changes its numbers. Per-image outcomes are 0/1, or
fractions under expected:K: robust "images" are then the sum of the fractions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.base import Attack
from ..attacks.pgd_eot import PGDEOT
from ..attacks.threat import MAX_EPS
from ..defenses.base import NoDefense
from ..errors import UserError

if TYPE_CHECKING:
    import pandas as pd

UNBOUNDED_STEP = {"Linf": 0.2, "L2": 8.0}  # 5 steps cross the whole box


@dataclass(frozen=True)
class SanityConfig:
    images: int = 8  # 0 turns the checks off (the row then says "not run")
    tolerance: int = 1  # images (in the sum of per-image outcomes) by which a larger budget may raise robust accuracy
    unbounded_steps: int = 5
    unbounded_accuracy: float = 0.1

    def __post_init__(self):
        if self.images < 0 or self.tolerance < 0 or self.unbounded_steps < 1 or not 0 <= self.unbounded_accuracy <= 1:
            raise UserError("sanity needs images >= 0, tolerance >= 0, unbounded_steps >= 1, 0 <= unbounded_accuracy <= 1")


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str


def run_sanity_checks(
    evaluate: Callable[[list[Attack], nn.Module | None, nn.Module | None], object],
    full: "pd.DataFrame",
    attacks: list[Attack],
    target: nn.Module,
    classifier: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    config: SanityConfig,
    started: Callable[[str], None] | None = None,
) -> list[CheckResult]:
    """All checks on the slice (x, y), in the order of ``check_names``. ``evaluate(attacks,
    defense=None, target=None)`` returns per-image results of the row's defense (or another)
    under the row's evaluation mode; ``full`` holds the row's own results on the slice (the
    full-budget reference); ``started(name)`` is called as each check begins (a progress bar)."""
    n = len(y)
    started = started or (lambda name: None)
    robust = lambda frame: float(frame["robust_correct"].sum())  # noqa: E731
    results = []

    started("eps-zero")
    at_zero = evaluate([a.replace(eps=0.0, steps=1 if a.steps else a.steps) for a in attacks])
    # With common random numbers the predictions themselves must agree, image by image (and,
    # under expected:K, in every pass: then each robust outcome equals the clean one).
    differ = int(((at_zero["adv_pred"] != at_zero["clean_pred"]) | (at_zero["robust_correct"] != at_zero["clean_correct"])).sum())
    results.append(CheckResult(
        "eps-zero", differ == 0,
        f"robust {_images(robust(at_zero))}/{n} vs clean {_images(float(at_zero['clean_correct'].sum()))}/{n} at eps 0, "
        f"{differ}/{n} predictions differ",
    ))

    started("eps-monotone")
    half_eps = evaluate([a.replace(eps=a.eps / 2) for a in attacks])
    results.append(_monotone("eps-monotone", robust(half_eps), robust(full), n, "eps/2", "eps", config.tolerance))

    if _halvable_steps(attacks):
        started("steps-monotone")
        half_steps = evaluate([a.replace(steps=a.steps // 2) for a in attacks])
        results.append(_monotone("steps-monotone", robust(half_steps), robust(full), n, "steps/2", "steps", config.tolerance))

    started("gradients")
    results.append(gradient_check(target, x, y))

    unbounded = [PGDEOT(norm=norm, eps=MAX_EPS[norm], step_size=UNBOUNDED_STEP[norm], steps=config.unbounded_steps, eot=1)]
    bare = NoDefense(classifier, None)
    for name, defended in (("unbounded-defended", True), ("unbounded-undefended", False)):
        started(name)
        frame = evaluate(unbounded) if defended else evaluate(unbounded, bare, bare)
        accuracy = robust(frame) / n
        results.append(CheckResult(
            name, accuracy <= config.unbounded_accuracy,
            f"{_images(robust(frame))}/{n} robust after {config.unbounded_steps}-step PGD with eps {MAX_EPS[norm]:g}",
        ))
    return results


def _halvable_steps(attacks: list[Attack]) -> bool:
    return all(a.steps and a.steps >= 2 for a in attacks)


def check_names(attacks: list[Attack]) -> list[str]:
    """The checks ``run_sanity_checks`` runs for a row attacked by ``attacks``, in order."""
    steps = ["steps-monotone"] if _halvable_steps(attacks) else []
    return ["eps-zero", "eps-monotone", *steps, "gradients", "unbounded-defended", "unbounded-undefended"]


def _images(count: float) -> str:
    """A sum of per-image outcomes: "3" for 0/1 outcomes, "3.25" for fractions."""
    return f"{round(count, 2):g}"


def _monotone(name: str, small: float, large: float, n: int, small_label: str, large_label: str, tolerance: int) -> CheckResult:
    return CheckResult(
        name, large <= small + tolerance + 1e-9,  # 1e-9: sums of fractions round
        f"robust {_images(small)}/{n} at {small_label}, {_images(large)}/{n} at {large_label} (tolerance {tolerance})",
    )


def gradient_check(target: nn.Module, x: torch.Tensor, y: torch.Tensor) -> CheckResult:
    """The input gradient of the summed cross-entropy through ``target`` on [0,1] images."""
    x = x.detach().clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(target(x), y, reduction="sum"), x)
    finite = bool(torch.isfinite(grad).all())
    norms = grad.flatten(1).norm(dim=1)
    zero = int((norms == 0).sum())
    return CheckResult(
        "gradients", finite and zero == 0,
        f"{'finite' if finite else 'NOT finite'}, {zero}/{len(y)} images with zero gradient",
    )


def summarise(results: list[CheckResult] | list[dict]) -> str:
    """The leaderboard's sanity cell: "ok", or the failed checks with their details (from the
    results or their stored dicts)."""
    failed = [r if isinstance(r, dict) else asdict(r) for r in results]
    failed = [r for r in failed if not r["passed"]]
    if not failed:
        return "ok"
    return "FAILED: " + "; ".join(f"{r['name']} ({r['detail']})" for r in failed)
