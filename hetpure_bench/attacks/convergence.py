"""Evidence that an iterative attack converged: what it saw per iteration, and the test on it.

An attack's own check is noisy (it judges its iterates with the stochastic passes it already
computed for its gradients, not with the evaluation's noise), so it is evidence of convergence,
never a result: robustness is always the runner's evaluation of the real defense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class AttackHistory:
    """Per record (one per model evaluation: a start point or an iteration) and per image, shapes
    (records, B): ``robust``, whether the best iterate so far survived the attack's own check;
    ``best_loss``, its loss; ``step_size``, the step size in force after that record."""

    robust: torch.Tensor
    best_loss: torch.Tensor
    step_size: torch.Tensor

    def robust_counts(self) -> list[int]:
        """The number of images surviving the attack's own check, per record."""
        return self.robust.sum(1).tolist()


def tail_change(history_counts: Sequence[int]) -> int:
    """How far the robust count moved over the last 25% of the records (the count at the start
    of that window included): max - min there."""
    counts = list(history_counts)
    if not counts:
        raise ValueError("an empty history says nothing about convergence")
    tail = counts[3 * (len(counts) - 1) // 4:]
    return max(tail) - min(tail)


def converged(history_counts: Sequence[int], n_images: int) -> bool:
    """True when the robust count moved by at most one image over the last 25% of the records
    (tail_change): more iterations would hardly help."""
    counts = list(history_counts)
    if any(not 0 <= c <= n_images for c in counts):
        raise ValueError(f"robust counts must lie in [0, {n_images}], got {counts}")
    return tail_change(counts) <= 1


def combined_counts(per_batch: Sequence[Sequence[int]]) -> list[int]:
    """The robust counts of a whole row from its batches' (one list per batch, record by
    record): their sum per record. A batch whose attack made fewer records contributes its
    last count to the later ones (its best iterates stay what they were when it stopped)."""
    if not per_batch or any(not counts for counts in per_batch):
        raise ValueError("every batch needs at least one record")
    length = max(len(counts) for counts in per_batch)
    return [sum(counts[min(r, len(counts) - 1)] for counts in per_batch) for r in range(length)]
