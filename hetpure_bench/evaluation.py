"""Evaluation modes: how a stochastic defense's prediction for one image is formed.

- "single": one purification;
- "vote:m": the majority label over m independent purifications (ties -> the lowest label).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError


def parse_evaluation_mode(mode: str) -> int:
    """The number of purifications per prediction: 1 for "single", m for "vote:m"."""
    if mode == "single":
        return 1
    kind, _, arg = mode.partition(":")
    if kind == "vote" and arg.isdigit() and int(arg) >= 1:
        return int(arg)
    raise UserError(f"unknown evaluation mode {mode!r}: use 'single' or 'vote:m'")


def majority_vote(predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(m, B) labels -> (B,) most frequent label per column, ties broken towards the lowest label."""
    counts = torch.zeros(predictions.shape[1], num_classes, dtype=torch.long, device=predictions.device)
    counts.scatter_add_(1, predictions.T, torch.ones_like(predictions.T))
    return counts.argmax(1)  # argmax returns the first maximal index


@torch.no_grad()
def predict(defense: nn.Module, x01: torch.Tensor, mode: str) -> torch.Tensor:
    """Predicted labels (B,) of ``defense`` on [0,1] images under an evaluation mode."""
    votes = parse_evaluation_mode(mode)
    logits = [defense(x01) for _ in range(votes)]
    if votes == 1:
        return logits[0].argmax(1)
    return majority_vote(torch.stack([l.argmax(1) for l in logits]), logits[0].shape[1])
