"""Attack histories (attacks/convergence.py) as the result store keeps them, one per batch and attack.

Every field of the history (per record and image: ``robust``, ``best_loss``, ``step_size``, and
whatever fields an attack's own history class adds, tensors or single numbers such as
DiffHammer's ``replay_deviation``) is kept, as a zlib-compressed .npz read back with
``allow_pickle=False``: booleans as they are, floats in float32, a number as a 0-d array. For APGD's 101 records of 32 images that is a few KB, small next to the batch's
adversarial examples, and the per-image outcomes stay available, not only the counts the row uses.
"""

from __future__ import annotations

import dataclasses
import io
import zlib

import numpy as np
import torch

from ..attacks.convergence import AttackHistory


def encode(history: AttackHistory) -> bytes:
    """The stored form of one batch's history."""
    arrays = {}
    for field in dataclasses.fields(history):
        value = torch.as_tensor(getattr(history, field.name)).detach().cpu()
        arrays[field.name] = value.numpy() if value.dtype == torch.bool else value.float().numpy()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return zlib.compress(buffer.getvalue())


def decode(blob: bytes) -> dict[str, np.ndarray]:
    """The stored fields by name: tensors (records, images), numbers 0-d."""
    with np.load(io.BytesIO(zlib.decompress(blob)), allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}


def robust_counts(blob: bytes) -> list[int]:
    """Per record, the images that survived the attack's own check (AttackHistory.robust_counts)."""
    return decode(blob)["robust"].sum(1).tolist()
