"""Linear classifiers and defenses built around them, where optimal attacks are closed-form."""

from __future__ import annotations

import torch
from torch import nn

from hetpure_bench.defenses.base import Defense, NoConfig


class LinearClassifier(nn.Module):
    """logits = W x + b on flattened [0,1] images."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


def linear_problem(n=16, classes=10, seed=0):
    """A random linear classifier and images inside (0.3, 0.7) labelled by it."""
    g = torch.Generator().manual_seed(seed)
    model = LinearClassifier(torch.randn(classes, 48, generator=g), torch.zeros(classes)).eval()
    x = 0.3 + 0.4 * torch.rand(n, 3, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def linf_breakable(model: LinearClassifier, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Closed form (away from the box edges): some class j beats y within the Linf ball iff
    (w_y - w_j).x + b_y - b_j < eps * ||w_y - w_j||_1."""
    w, b = model.weight, model.bias
    diff = w[y].unsqueeze(1) - w.unsqueeze(0)  # (B, C, D)
    margins = (diff * x.flatten(1).unsqueeze(1)).sum(-1) + b[y].unsqueeze(1) - b.unsqueeze(0)
    slack = margins - eps * diff.abs().sum(-1)
    slack[torch.arange(len(y)), y] = float("inf")
    return (slack < 0).any(1)


class FixedDefense(Defense):
    """A diffusion-free test defense around a classifier; subclasses define ``purify``."""

    name = "fixed-test-defense"
    config_class = NoConfig
    needs_diffusion = False

    @property
    def nfe(self) -> int:
        return 0
