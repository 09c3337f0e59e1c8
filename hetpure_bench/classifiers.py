"""The classifier registry. Every classifier takes images in [0, 1] and returns logits."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .attention_mask import MASK_HOOKS
from .registry import Registry

CLASSIFIERS: Registry[nn.Module] = Registry("classifier")


def _pyautoattack_resnet18_path() -> Path:
    return Path(str(resources.files("pyautoattack") / "examples" / "model_test.pt"))


def load_pyautoattack_resnet18() -> nn.Module:
    """The standard-trained CIFAR-10 ResNet-18 shipped inside the pyautoattack wheel."""
    from pyautoattack.examples.resnet import ResNet18

    model = ResNet18()
    state = torch.load(_pyautoattack_resnet18_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


CLASSIFIERS.register(
    "resnet18-pyautoattack",
    load_pyautoattack_resnet18,
    available=lambda: _pyautoattack_resnet18_path().is_file(),
    architecture="ResNet-18",
    mask_hooks=MASK_HOOKS["resnet-18"],
    training="standard (no adversarial training)",
    input_range="[0,1], no normalisation",
    source="pyautoattack wheel, examples/model_test.pt",
    note="embedded default; 86.5% clean on 2,000 images of the JPEG CIFAR-10 copy (ENVIRONMENT.md)",
)


def load_classifier(name: str) -> nn.Module:
    """Build a registered classifier in eval mode with frozen parameters.

    The model carries ``mask_hooks``: the blocks the attention mask of hetpure hooks.
    """
    entry = CLASSIFIERS.get(name)
    model = entry.build()
    model.requires_grad_(False)
    model.mask_hooks = tuple(entry.info.get("mask_hooks", ()))
    return model.eval()
