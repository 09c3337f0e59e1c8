"""Adversarial examples as the store keeps them: float16 perturbations, compressed, decoded back
into the eps-ball and the [0,1] box."""

import io
import zlib

import numpy as np
import pytest
import torch

from hetpure_bench.attacks.threat import perturbation_size, project
from hetpure_bench.bench.stored_examples import decode, encode

RAW_BYTES = 32 * 3 * 32 * 32 * 2  # 32 CIFAR-10 images in float16: 196,608 bytes


def _pgd_like(eps, norm="Linf", seed=0):
    """32 [0,1] images and examples at the edge of the eps-ball, clipped to the box, as PGD leaves them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(32, 3, 32, 32, generator=g)
    step = torch.randn(x.shape, generator=g)
    direction = step.sign() if norm == "Linf" else step / step.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return x, project(x + eps * direction, x, norm, eps)


@pytest.mark.parametrize("norm, eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_round_trip_stays_close_inside_the_ball_and_the_box(norm, eps):
    x, x_adv = _pgd_like(eps, norm)
    decoded = decode(encode(x_adv, x), x, norm, eps)
    assert decoded.dtype == x.dtype and decoded.shape == x.shape
    # float16 keeps 11 significant bits of the perturbation (|delta| <= eps): error <= eps / 2048.
    assert (decoded - x_adv).abs().max() <= eps / 2048
    assert (perturbation_size(decoded - x, norm) <= eps * (1 + 1e-6) + 1e-7).all()
    assert decoded.min() >= 0 and decoded.max() <= 1


def test_a_batch_of_32_linf_examples_is_stored_in_less_than_its_raw_float16_size():
    x, x_adv = _pgd_like(8 / 255)
    blob = encode(x_adv, x)
    assert len(blob) < RAW_BYTES / 4  # mostly +-eps: few distinct values compress well
    g = torch.Generator().manual_seed(1)
    noise = project(x + 0.03 * (2 * torch.rand(x.shape, generator=g) - 1), x, "Linf", 0.03)
    assert len(encode(noise, x)) < RAW_BYTES  # even a perturbation of uniform noise


def test_decoding_projects_what_float16_rounding_pushes_out_of_the_ball_and_the_box():
    eps = 0.04  # float16(0.04) = 0.04000854...: rounds up
    x = torch.full((1, 3, 2, 2), 0.5)
    x[0, 0] = 1 - 0.0313  # float16(0.0313) rounds up, so x + it would exceed 1
    x_adv = torch.where(x > 0.9, torch.ones_like(x), x + eps)
    raw = x + torch.from_numpy(np.load(io.BytesIO(zlib.decompress(encode(x_adv, x))), allow_pickle=False)).float()
    assert perturbation_size(raw - x, "Linf").item() > eps + 1e-6 and raw.max() > 1  # what rounding alone gives
    decoded = decode(encode(x_adv, x), x, "Linf", eps)
    assert perturbation_size(decoded - x, "Linf").item() <= eps + 1e-7 and decoded.max() <= 1
    assert torch.equal(decoded[0, 0], torch.ones(2, 2))


def test_the_same_examples_give_the_same_bytes():
    x, x_adv = _pgd_like(8 / 255)
    assert encode(x_adv, x) == encode(x_adv.clone(), x.clone())


def test_no_pickle_and_no_blob_of_other_images():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"not": "an array"}], dtype=object), allow_pickle=True)
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="allow_pickle"):
        decode(zlib.compress(buffer.getvalue()), x, "Linf", 0.1)
    with pytest.raises(ValueError, match="shape"):
        decode(encode(x, x), torch.zeros(2, 3, 2, 2), "Linf", 0.1)
