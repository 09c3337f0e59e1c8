import pytest
import torch

from hetpure_bench.defenses import build_defense
from hetpure_bench.noise import NoiseStreams, rand_like, randn_like, stream_seed
from tiny_models import tiny_models


def test_one_generator_per_row_draws_each_row_from_its_own_stream():
    x = torch.zeros(3, 2, 4, 4)
    five, six = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    gens = [five, six, five]
    noise = randn_like(x, gens)
    assert torch.equal(noise[0], torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(noise[1], torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(6)))
    assert not torch.equal(noise[0], noise[2])  # two rows from one generator: its stream advances
    assert rand_like(x, [torch.Generator().manual_seed(0)] * 3).min() >= 0
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn_like(x, gens[:2])


def test_copies_of_the_images_draw_from_their_images_streams_in_order():
    x = torch.zeros(6, 1, 2, 2)  # 3 copies of 2 images, as x.repeat(3, 1, 1, 1) makes
    noise = randn_like(x, NoiseStreams([11, 12]).for_batch(x))
    for image, seed in enumerate((11, 12)):
        g = torch.Generator().manual_seed(seed)
        expected = torch.stack([torch.randn(1, 2, 2, generator=g) for _ in range(3)])
        assert torch.equal(noise[image::2], expected)


def test_a_batch_that_is_not_copies_of_the_images_uses_one_shared_stream():
    streams = NoiseStreams([1, 2, 3])
    shared = streams.for_batch(torch.zeros(2, 1))
    assert isinstance(shared, torch.Generator) and shared is streams.for_batch(torch.zeros(4, 1))
    assert isinstance(NoiseStreams(7).for_batch(torch.zeros(5, 1)), torch.Generator)  # an int: one stream
    assert stream_seed(0, 3, "attack") != stream_seed(0, 3, "evaluate") != stream_seed(1, 3, "evaluate")


@pytest.mark.parametrize("name, overrides", [
    ("hetpure", {"t_l": 40, "t_s": 20, "stride": 20}),
    ("hetpure-randmask", {"t_l": 40, "t_s": 20, "stride": 20}),
    ("diffpure", {"sampler": "sde", "t_star": 0.04, "sde_dt": 0.01}),
])
def test_an_images_purification_does_not_depend_on_its_batch(name, overrides):
    classifier, diffusion = tiny_models()
    defense = build_defense(name, classifier, diffusion, overrides)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seeds = [stream_seed(0, i, "evaluate") for i in (10, 11, 12, 13)]
    defense.reseed(seeds)
    together = defense.purify(x)
    for i in range(4):
        defense.reseed([seeds[i]])
        assert torch.allclose(defense.purify(x[i:i + 1]), together[i:i + 1], atol=1e-6), f"image {i}"
    defense.reseed(seeds[::-1])
    reversed_batch = defense.purify(x.flip(0))
    assert torch.allclose(reversed_batch.flip(0), together, atol=1e-6)
    defense.reseed([stream_seed(1, i, "evaluate") for i in (10, 11, 12, 13)])
    assert not torch.allclose(defense.purify(x), together)  # another seed: other noise
