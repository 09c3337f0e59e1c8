"""Shared fixtures: tiny generated CIFAR-like data and the shared JPEG copy when it is present."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hetpure_bench.data import CLASSES

SHARED_JPEG = Path(
    os.environ.get("HETPURE_TEST_JPEG", Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg")
)
# Subprocesses' time limit: a guard against a hung process, never a speed check (a busy machine
# can slow a tiny run tenfold).
HANG_GUARD_S = 1800


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path_factory, monkeypatch):
    """No test reads the user's cache or data settings, and torch uses the 2 cores it has."""
    monkeypatch.setenv("HETPURE_HOME", str(tmp_path_factory.mktemp("hetpure_home")))
    monkeypatch.delenv("HETPURE_DATA", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)  # restored after a test whose in-process CLI run sets it
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def shared_jpeg() -> Path:
    if not (SHARED_JPEG / "test.tar").is_file():
        pytest.skip(f"shared JPEG CIFAR-10 copy not found at {SHARED_JPEG}")
    return SHARED_JPEG


def random_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n random uint8 images (n, 3, 32, 32) and labels cycling through 0..9."""
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, (n, 3, 32, 32), dtype=np.uint8), np.arange(n) % len(CLASSES)


def write_image_tar(path: Path, n: int, split: str, seed: int = 0) -> Path:
    """n random PNG images in a .tar of ``<split>/<class>/<i>.png`` folders (the JPEG copy's layout)."""
    images, labels = random_images(n, seed)
    with tarfile.open(path, "w") as tar:
        for i, (image, label) in enumerate(zip(images, labels)):
            blob = io.BytesIO()
            Image.fromarray(image.transpose(1, 2, 0)).save(blob, format="PNG")
            info = tarfile.TarInfo(f"{split}/{CLASSES[label]}/{i:04d}.png")
            info.size = blob.tell()
            blob.seek(0)
            tar.addfile(info, blob)
    return path


def write_pickle_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """A batch file in the official CIFAR-10 python format (flattened CHW rows, label list)."""
    entry = {"data": images.reshape(len(images), -1), "labels": labels.tolist(), "batch_label": b"test"}
    with open(path, "wb") as handle:
        pickle.dump(entry, handle)
