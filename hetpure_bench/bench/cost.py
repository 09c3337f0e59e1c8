"""Cost estimates before a run (``run --dry-run``): network calls counted in closed form from
the defense's NFE and the attack's settings, and hours from one measured network pass on the
current device (random weights of the same architecture: the weights need not be present).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..attacks.apgd import APGDEOT
from ..attacks.autoattack import AutoAttackSuite
from ..attacks.base import Attack
from ..attacks.diffattack import DiffAttack
from ..attacks.diffhammer import DiffHammer
from ..attacks.gradients import parse_gradient_mode
from ..attacks.pgd_eot import PGDEOT
from ..attacks.torchattacks_adapter import TorchAttack
from .evaluation import parse_evaluation_mode

# AutoAttack standard's targeted attacks run against 9 target classes.
AUTOATTACK_TARGETS = 9


def gradient_evaluations(attack: Attack) -> int:
    """Forward+backward passes through the attacked module per image (an upper bound: it counts
    every image through every sub-attack, also those already broken)."""
    if isinstance(attack, PGDEOT):
        return attack.steps * attack.eot
    if isinstance(attack, DiffAttack):  # L_dev rides on the same passes: no extra network call
        return len(attack.losses) * attack.restarts * (attack.steps + 1) * attack.eot
    if isinstance(attack, APGDEOT):
        return attack.restarts * (attack.steps + 1) * attack.eot  # each restart's start point too
    if isinstance(attack, DiffHammer):
        return len(attack.losses) * attack.steps  # one purifier backprop per step (the representative's)
    if isinstance(attack, AutoAttackSuite):
        if attack.version == "rand":
            return 2 * attack.steps * attack.eot_samples  # APGD-CE and APGD-DLR
        return attack.steps * (1 + 2 * AUTOATTACK_TARGETS)  # APGD-CE, APGD-T and FAB-T
    if isinstance(attack, TorchAttack):
        params = dict(attack.params)
        return (attack.steps or 1) * int(params.get("eot_iter", 1)) * int(params.get("n_restarts", 1))
    raise TypeError(f"no cost model for {type(attack).__name__}")


def forward_queries(attack: Attack) -> int:
    """Forward-only passes per image (AutoAttack standard's Square attack; PGD-EOT's check of the
    returned iterate, its EOT copies, after a step at least; DiffHammer's N purifications of the clean image and of every
    iterate, each with a classifier backprop that counts here as a classifier forward)."""
    if isinstance(attack, AutoAttackSuite) and attack.version == "standard":
        return attack.square_queries
    if isinstance(attack, PGDEOT):
        return attack.eot if attack.steps else 0
    if isinstance(attack, DiffHammer):
        return attack.purifications * (1 + len(attack.losses) * (attack.steps + 1))
    return 0


@dataclass(frozen=True)
class PassTimes:
    """Seconds per image of one network pass on ``device``, at batch ``batch``."""

    device: str
    batch: int
    diffusion_forward: float
    diffusion_forward_backward: float
    classifier_forward: float
    classifier_forward_backward: float


def _seconds(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def measure_passes(diffusion: nn.Module | None, classifier: nn.Module, batch: int, device: torch.device) -> PassTimes:
    """Time forward and forward+backward (w.r.t. the input) passes of both networks."""
    x = torch.rand(batch, 3, 32, 32, device=device)
    t = torch.full((batch,), 100, device=device, dtype=torch.long)

    def forward(model, *args):
        with torch.no_grad():
            model(x * 2 - 1 if args else x, *args)

    def forward_backward(model, *args):
        inputs = (x * 2 - 1 if args else x).detach().requires_grad_(True)
        model(inputs, *args).float().sum().backward()

    per_image = lambda seconds: seconds / batch  # noqa: E731
    diffusion_times = (0.0, 0.0)
    if diffusion is not None:
        diffusion_times = (per_image(_seconds(lambda: forward(diffusion, t))), per_image(_seconds(lambda: forward_backward(diffusion, t))))
    return PassTimes(
        str(device), batch, *diffusion_times,
        per_image(_seconds(lambda: forward(classifier))), per_image(_seconds(lambda: forward_backward(classifier))),
    )


@dataclass(frozen=True)
class CostEstimate:
    network_calls_per_image: int  # diffusion-network calls (attack + evaluation)
    classifier_passes_per_image: int
    seconds_per_image: float
    images: int

    @property
    def hours(self) -> float:
        return self.seconds_per_image * self.images / 3600


def estimate(
    attacks: list[Attack], defense_nfe: int, gradient: str, evaluation: str, images: int, times: PassTimes,
    surrogate_nfe: int | None = None,
) -> CostEstimate:
    """Network calls and time per image for one row. A full-gradient call costs a forward pass
    (checkpointed: nothing stored) plus a recomputing forward+backward pass."""
    kind, _ = parse_gradient_mode(gradient)
    votes = parse_evaluation_mode(evaluation)[1]
    grad_calls = {"full": defense_nfe, "surrogate": surrogate_nfe or defense_nfe, "bpda": defense_nfe}[kind]
    grad_evals = sum(gradient_evaluations(a) for a in attacks)
    queries = sum(forward_queries(a) for a in attacks)
    eval_passes = (1 + len(attacks)) * votes
    diffusion_backward = kind != "bpda"
    attack_diffusion = grad_evals * grad_calls * (
        times.diffusion_forward + (times.diffusion_forward_backward if diffusion_backward else 0.0)
    )
    forward_calls = (queries + eval_passes) * defense_nfe
    seconds = (
        attack_diffusion + forward_calls * times.diffusion_forward
        + grad_evals * times.classifier_forward_backward + (queries + eval_passes) * times.classifier_forward
    )
    return CostEstimate(
        network_calls_per_image=grad_evals * grad_calls + forward_calls,
        classifier_passes_per_image=grad_evals + queries + eval_passes,
        seconds_per_image=seconds, images=images,
    )
