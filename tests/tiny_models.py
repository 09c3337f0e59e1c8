"""Tiny deterministic networks for fast defense and attack tests (8x8 images, 3 classes... 10)."""

from __future__ import annotations

import torch
from torch import nn

from hetpure_bench.diffusion.networks import EpsModel, build_unet

TINY_UNET = {
    "sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": [8, 16],
    "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4,
}


class TinyClassifier(nn.Module):
    """Two conv blocks (hookable as layer1, layer2) and a linear head; [0,1] input."""

    mask_hooks = ("layer1", "layer2")

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.layer2(self.layer1(x)).mean((2, 3)))


def tiny_models(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    classifier = TinyClassifier().to(dtype).eval().requires_grad_(False)
    diffusion = EpsModel(build_unet(TINY_UNET)).to(dtype).eval().requires_grad_(False)
    return classifier, diffusion
