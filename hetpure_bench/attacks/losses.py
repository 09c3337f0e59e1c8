"""Per-image attack losses on logits (B, C) and labels (B,): higher is more adversarial.

- ``ce``: cross-entropy;
- ``margin``: the CW margin max_{k != y} z_k - z_y (positive once the image is misclassified;
  DiffBreak's default for APGD);
- ``dlr``: Croce & Hein's difference of logits ratio, the margin divided by z_pi1 - z_pi3
  (pi: the logits sorted in descending order), invariant to shifting and scaling the logits.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UserError

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(1) - true


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] < 3:
        raise UserError(f"the dlr loss needs at least 3 classes, the model has {logits.shape[1]}")
    top = logits.sort(1, descending=True).values
    return margin(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


LOSSES: dict[str, Loss] = {"ce": ce, "margin": margin, "dlr": dlr}


def loss_function(name: str) -> Loss:
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown attack loss {name!r}: choose {', '.join(LOSSES)}") from None
