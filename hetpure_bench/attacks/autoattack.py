"""AutoAttack (Croce & Hein, ICML 2020) through pyautoattack, for stochastic defenses too.

pyautoattack reseeds the global RNG; a Defense draws its noise from its own generator, and the
global RNG is restored afterwards (``isolated_global_rng``), so neither stream is disturbed.
The runner, not AutoAttack's own bookkeeping, decides robustness: it evaluates the real defense
on the returned examples in the run's evaluation mode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .base import Attack, isolated_global_rng
from .threat import NORMS

VERSIONS = ("standard", "rand")
DEFAULT_STEPS = 100
DEFAULT_EOT = {"standard": 1, "rand": 20}
DEFAULT_SQUARE_QUERIES = 5000


def set_apgd_iterations(apgd, steps: int) -> None:
    """APGD derives its step-size checkpoints from n_iter in __init__; keep them consistent."""
    apgd.n_iter = apgd.n_iter_orig = steps
    apgd.n_iter_2 = max(int(0.22 * steps), 1)
    apgd.n_iter_min = max(int(0.06 * steps), 1)
    apgd.size_decr = max(int(0.03 * steps), 1)


@dataclass(frozen=True)
class AutoAttackSuite(Attack):
    """``standard``: APGD-CE, APGD-T, FAB-T, Square. ``rand``: APGD-CE and APGD-DLR with EOT.
    ``steps``, ``eot`` and ``square_queries`` shrink it for smoke runs; the name says so."""

    norm: str = "Linf"
    eps: float = 8 / 255
    version: str = "standard"
    steps: int = DEFAULT_STEPS
    eot: int | None = None  # None: AutoAttack's own (1 for standard, 20 for rand)
    square_queries: int = DEFAULT_SQUARE_QUERIES
    seed: int = 0

    def __post_init__(self):
        if self.norm not in NORMS:
            raise UserError(f"unknown norm {self.norm!r}: choose Linf or L2")
        if self.version not in VERSIONS:
            raise UserError(f"unknown AutoAttack version {self.version!r}: choose standard, rand or standard+rand")
        if self.steps < 1 or (self.eot is not None and self.eot < 1) or self.square_queries < 1:
            raise UserError("AutoAttack needs steps >= 1, eot >= 1 and square_queries >= 1")

    @property
    def eot_samples(self) -> int:
        return self.eot if self.eot is not None else DEFAULT_EOT[self.version]

    @property
    def name(self) -> str:
        changed = []
        if self.steps != DEFAULT_STEPS:
            changed.append(f"{self.steps} iter")
        if self.eot_samples != DEFAULT_EOT[self.version]:
            changed.append(f"EOT {self.eot_samples}")
        if self.version == "standard" and self.square_queries != DEFAULT_SQUARE_QUERIES:
            changed.append(f"Square {self.square_queries} queries")
        return f"AutoAttack-{self.version}" + (f"({', '.join(changed)})" if changed else "")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool = False) -> torch.Tensor:
        from pyautoattack import AutoAttack

        with isolated_global_rng(x.device):
            adversary = AutoAttack(model, norm=self.norm, eps=self.eps, version=self.version, device=x.device, seed=self.seed)
            for apgd in (adversary.apgd, adversary.apgd_targeted):
                set_apgd_iterations(apgd, self.steps)
                apgd.eot_iter = self.eot_samples
            adversary.fab.n_iter = self.steps
            adversary.square.n_queries = self.square_queries
            level = adversary.logger.level
            adversary.logger.setLevel(logging.ERROR)  # its "randomized defense" warning repeats per batch
            try:
                x_adv, _ = adversary.run_standard_evaluation(x.detach(), y, batch_size=len(x))
            finally:
                adversary.logger.setLevel(level)
        return x_adv.detach()


def build_autoattack(norm: str, eps: float, seed: int, version: str = "standard", **settings) -> list[Attack]:
    """One attack per version; "standard+rand" gives both, and the runner counts an image as
    robust only if it survives both (per-image worst case, never above DiffPure's min of the two)."""
    return [AutoAttackSuite(norm=norm, eps=eps, seed=seed, version=v, **settings) for v in str(version).split("+")]
