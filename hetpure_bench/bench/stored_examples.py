"""Adversarial examples as the result store keeps them, so stored ones can be judged again.

An example is stored as its perturbation x_adv - x in float16 (for a perturbation of at most
eps per pixel, rounding moves it by at most about eps / 2048, far less than storing x_adv itself
in float16, which moves pixels near 1 by up to 2.4e-4), as a .npy array compressed with zlib
(the same examples give the same bytes) and read back with ``allow_pickle=False``. Decoding
projects it back into the eps-ball around the clean [0,1] images and into the [0,1] box, which
float16 rounding can leave. The runner judges the decoded examples, also right after the
attack, so that judging stored examples again gives the same records bit for bit.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import torch

from ..attacks.threat import project


def encode(x_adv01: torch.Tensor, x01: torch.Tensor) -> bytes:
    """The stored form of adversarial [0,1] images ``x_adv01`` of the clean [0,1] images ``x01``."""
    delta = (x_adv01 - x01).detach().to("cpu", torch.float16).numpy()
    buffer = io.BytesIO()
    np.save(buffer, delta, allow_pickle=False)
    return zlib.compress(buffer.getvalue())


def decode(blob: bytes, x01: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Adversarial [0,1] images (like ``x01``: same shape, dtype and device) from their stored
    form, inside the ``norm`` eps-ball around ``x01`` and the [0,1] box."""
    delta = torch.from_numpy(np.load(io.BytesIO(zlib.decompress(blob)), allow_pickle=False))
    if delta.shape != x01.shape:
        raise ValueError(f"stored examples of shape {tuple(delta.shape)} for images of shape {tuple(x01.shape)}")
    return project(x01 + delta.to(x01.device, x01.dtype), x01, norm, eps)
