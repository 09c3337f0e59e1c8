import pytest
import torch

from hetpure_bench.classifiers import CLASSIFIERS, load_classifier
from hetpure_bench.data import load_cifar10
from hetpure_bench.errors import UnknownNameError


def test_embedded_resnet18_is_registered_and_offline():
    entry = CLASSIFIERS.get("resnet18-pyautoattack")
    assert entry.available() and entry.info["input_range"].startswith("[0,1]")


def test_embedded_resnet18_is_frozen_and_classifies_real_images(shared_jpeg):
    model = load_classifier("resnet18-pyautoattack")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    data = load_cifar10(str(shared_jpeg), "test").subset(200, seed=0)
    with torch.no_grad():
        logits = model(data.as_float())
    assert logits.shape == (200, 10)
    accuracy = (logits.argmax(1) == data.labels).float().mean().item()
    assert 0.80 <= accuracy <= 0.95  # 86.5% on 2,000 JPEG images (ENVIRONMENT.md)


def test_unknown_classifier():
    with pytest.raises(UnknownNameError, match="did you mean 'resnet18-pyautoattack'"):
        load_classifier("resnet18-autoattack")
