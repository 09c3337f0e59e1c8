"""Evaluation modes: how a stochastic defense's prediction for one image is formed and judged.

- "single": one purification;
- "vote:m": the majority label over m independent purifications (ties -> the lowest label);
- "worst:N": N independent purifications, and the image counts as misclassified if any of them
  is (the reported label is the first wrong one);
- "expected:K": K independent purifications, each judged on its own: an image's outcome is the
  fraction of them that are right (DiffHammer's "Avg"), so accuracy is the expected accuracy of
  one purification.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..errors import UserError

MODES = ("single", "vote", "worst", "expected")


def parse_evaluation_mode(mode: str) -> tuple[str, int]:
    """(kind, purifications per prediction): ("single", 1), ("vote", m), ("worst", N) or ("expected", K)."""
    if mode == "single":
        return "single", 1
    kind, _, arg = mode.partition(":")
    if kind in MODES[1:] and arg.isdigit() and int(arg) >= 1:
        return kind, int(arg)
    raise UserError(f"unknown evaluation mode {mode!r}: use 'single', 'vote:m', 'worst:N' or 'expected:K'")


def majority_vote(predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(m, B) labels -> (B,) most frequent label per column, ties broken towards the lowest label."""
    counts = torch.zeros(predictions.shape[1], num_classes, dtype=torch.long, device=predictions.device)
    counts.scatter_add_(1, predictions.T, torch.ones_like(predictions.T))
    return counts.argmax(1)  # argmax returns the first maximal index


def worst_case(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, B) labels -> (B,): the true label if all N are right, else the first wrong label."""
    wrong = predictions != labels
    first_wrong = wrong.to(torch.uint8).argmax(0)  # index of the first True (0 if none)
    chosen = predictions.gather(0, first_wrong.unsqueeze(0)).squeeze(0)
    return torch.where(wrong.any(0), chosen, labels)


@torch.no_grad()
def purification_passes(defense: nn.Module, x01: torch.Tensor, passes: int) -> tuple[torch.Tensor, list[float]]:
    """Predicted labels (passes, B) of ``passes`` successive calls of ``defense`` on [0,1]
    images, and the seconds each call took."""
    predictions, seconds = [], []
    for _ in range(passes):
        started = time.perf_counter()
        predictions.append(defense(x01).argmax(1))
        seconds.append(time.perf_counter() - started)
    return torch.stack(predictions), seconds


def _first_passes(mode: str, predictions: torch.Tensor) -> tuple[str, torch.Tensor]:
    kind, passes = parse_evaluation_mode(mode)
    if passes > predictions.shape[0]:
        raise ValueError(f"{mode} needs {passes} passes, got {predictions.shape[0]}")
    return kind, predictions[:passes]


def combine(mode: str, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One label per image (B,) from the first passes of ``predictions`` (passes, B): after one
    reseed, pass k is the same for every mode, so modes can share their passes. expected:K has
    no single label (its passes are judged one by one, see judged_labels)."""
    kind, first = _first_passes(mode, predictions)
    if kind == "single":
        return first[0]
    if kind == "vote":
        return majority_vote(first, int(predictions.max()) + 1)
    if kind == "worst":
        return worst_case(first, labels.to(predictions.device))
    raise ValueError(f"{mode} judges each of its passes; it has no single label")


def judged_labels(mode: str, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The labels (P, B) a mode judges an image by: its one label (P = 1) for single, vote:m and
    worst:N; the K passes themselves for expected:K."""
    kind, first = _first_passes(mode, predictions)
    return first if kind == "expected" else combine(mode, predictions, labels).unsqueeze(0)


def outcomes(mode: str, correct: torch.Tensor) -> list[bool] | list[float]:
    """Per-image outcomes from the judged labels' correctness (P, B): for expected:K the fraction
    (a float in [0,1]) of the K judged passes that are right, else the one judgement (a bool)."""
    if parse_evaluation_mode(mode)[0] == "expected":
        return [count / correct.shape[0] for count in correct.sum(0).tolist()]
    return correct[0].tolist()


def predict(defense: nn.Module, x01: torch.Tensor, labels: torch.Tensor, mode: str) -> torch.Tensor:
    """Predicted labels (B,) of ``defense`` on [0,1] images under a single-label evaluation mode
    (the labels are needed by worst-of-N only)."""
    return combine(mode, purification_passes(defense, x01, parse_evaluation_mode(mode)[1])[0], labels)
